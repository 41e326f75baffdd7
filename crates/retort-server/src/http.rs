//! The HTTP set-up both servers share (`retort serve`'s API and `retort review`'s pages): a
//! two-thread tokio runtime, the listener, and a graceful stop on Ctrl-C.

use std::net::SocketAddr;

use axum::Router;

/// Bind `host:port`, build the app for the bound address (`app` may print it, put it in a token
/// URL, …), and serve it until Ctrl-C. Blocks.
pub(crate) fn serve_until_ctrl_c<E: From<std::io::Error>>(
    host: &str,
    port: u16,
    app: impl FnOnce(SocketAddr) -> Result<Router, E>,
) -> Result<(), E> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port)).await?;
        let app = app(listener.local_addr()?)?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}
