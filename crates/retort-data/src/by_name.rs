//! Serde for a value written in files by its name (`"jsd:0.5"`, `"q8"`): anything with
//! `FromStr` and `Display` (the one parser the CLI uses too), so a recipe or pipeline field is
//! parsed and checked once, where the file is read, and its error names the field.
//!
//! ```
//! #[derive(serde::Deserialize)]
//! struct Row {
//!     #[serde(with = "retort_data::by_name")]
//!     port: std::net::Ipv4Addr,
//! }
//! let r: Row = serde_json::from_str(r#"{"port": "127.0.0.1"}"#).unwrap();
//! assert!(serde_json::from_str::<Row>(r#"{"port": "nope"}"#).is_err());
//! ```

use std::fmt::Display;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
where
    T: FromStr,
    T::Err: Display,
    D: Deserializer<'de>,
{
    let name = String::deserialize(d)?;
    name.parse().map_err(D::Error::custom)
}
