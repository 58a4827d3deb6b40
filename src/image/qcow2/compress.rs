//! Inflating compressed clusters: raw deflate (zlib, the default) or zstd.

use super::header::CompressionType;
use std::io::Read;

/// Inflates `input` into exactly `cluster_size` bytes. The input may carry
/// trailing bytes of the next compressed cluster (sector rounding); both
/// decoders stop once the cluster is complete.
pub fn inflate(
    kind: CompressionType,
    input: &[u8],
    cluster_size: usize,
) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; cluster_size];
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            d.decompress(input, &mut out, flate2::FlushDecompress::Finish)
                .map_err(|e| format!("deflate: {e}"))?;
            if d.total_out() != cluster_size as u64 {
                return Err(format!(
                    "deflate produced {} of {cluster_size} bytes",
                    d.total_out()
                ));
            }
        }
        CompressionType::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| format!("zstd: {e}"))?;
            d.read_exact(&mut out).map_err(|e| format!("zstd: {e}"))?;
        }
    }
    Ok(out)
}
