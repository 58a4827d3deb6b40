//! Inflating compressed clusters: raw deflate (zlib, the default) or zstd.

use super::header::CompressionType;
use std::io::Read;

/// Why a compressed cluster does not inflate to one whole cluster.
#[derive(Debug, thiserror::Error)]
pub enum InflateError {
    #[error("deflate: {0}")]
    Deflate(#[from] flate2::DecompressError),
    #[error("deflate produced {produced} of {cluster_size} bytes")]
    Short { produced: u64, cluster_size: usize },
    #[error("zstd: {0}")]
    Zstd(#[from] std::io::Error),
}

/// Inflates `input` into exactly `cluster_size` bytes. The input may carry
/// trailing bytes of the next compressed cluster (sector rounding); both
/// decoders stop once the cluster is complete.
pub fn inflate(
    kind: CompressionType,
    input: &[u8],
    cluster_size: usize,
) -> Result<Vec<u8>, InflateError> {
    let mut out = vec![0u8; cluster_size];
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            d.decompress(input, &mut out, flate2::FlushDecompress::Finish)?;
            if d.total_out() != cluster_size as u64 {
                return Err(InflateError::Short {
                    produced: d.total_out(),
                    cluster_size,
                });
            }
        }
        CompressionType::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)?;
            d.read_exact(&mut out)?;
        }
    }
    Ok(out)
}
