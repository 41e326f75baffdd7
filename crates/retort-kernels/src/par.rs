//! Row-parallel loops on candle's thread count, shared by the fused kernels.

/// Run `f(row_index, out_row)` over the `row_len`-long rows of `out`, split into one contiguous
/// range of rows per thread.
pub fn rows<F>(out: &mut [f32], row_len: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if row_len == 0 || out.is_empty() {
        return;
    }
    let n = out.len() / row_len;
    let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
    let per = n.div_ceil(threads);
    if threads == 1 || out.len() < 1 << 14 {
        for (r, o) in out.chunks_mut(row_len).enumerate() {
            f(r, o);
        }
        return;
    }
    let f = &f;
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(per * row_len).enumerate() {
            s.spawn(move || {
                for (j, o) in part.chunks_mut(row_len).enumerate() {
                    f(c * per + j, o);
                }
            });
        }
    });
}

/// Like [`rows`] over two outputs with the same row structure (`a` rows of `la`, `b` of `lb`),
/// with a per-thread accumulator `acc` (length `acc_len`, zeroed) summed over threads at the end.
pub fn rows2_acc<F>(a: &mut [f32], la: usize, acc_len: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync,
{
    let mut total = vec![0f32; acc_len];
    if la == 0 || a.is_empty() {
        return total;
    }
    let n = a.len() / la;
    let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
    let per = n.div_ceil(threads);
    let f = &f;
    let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = a
            .chunks_mut(per * la)
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || {
                    let mut acc = vec![0f32; acc_len];
                    for (j, o) in part.chunks_mut(la).enumerate() {
                        f(c * per + j, o, &mut acc);
                    }
                    acc
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| vec![f32::NAN; acc_len]))
            .collect()
    });
    for p in parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}
