//! The background writer thread: the engine hands it output chunks through a bounded queue,
//! so disk writes overlap the arithmetic.

use crate::error::{DimcutError, Result};
use crate::shards::ShardFiles;
use std::path::PathBuf;
use std::sync::mpsc;

/// Chunks queued for the writer thread beyond the one it writes and the one being filled.
const QUEUE_DEPTH: usize = 2;

/// Bytes of chunk buffers `write_in_background` may hold at once with chunks of `chunk` bytes.
pub fn background_buffer_bytes(chunk: usize) -> usize {
    (QUEUE_DEPTH + 2) * chunk
}

/// Bytes for one shard at one offset.
struct Chunk {
    shard: usize,
    offset: usize,
    bytes: Vec<u8>,
}

/// The producer side of `write_in_background`: coalesces contiguous writes into chunks of at
/// most `chunk` bytes and hands them to the writer thread (blocking while its queue is full).
pub struct Writes {
    sender: mpsc::SyncSender<Chunk>,
    recycled: mpsc::Receiver<Vec<u8>>,
    pending: Option<Chunk>,
    chunk: usize,
}

impl Writes {
    /// Queues `bytes` for absolute `offset` of shard `shard`.
    pub fn write(&mut self, shard: usize, mut offset: usize, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let extends_pending = self.pending.as_ref().is_some_and(|p| {
                p.shard == shard && p.offset + p.bytes.len() == offset && p.bytes.len() < self.chunk
            });
            if !extends_pending {
                self.flush()?;
                let mut buffer = self
                    .recycled
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(self.chunk));
                buffer.clear();
                self.pending = Some(Chunk {
                    shard,
                    offset,
                    bytes: buffer,
                });
            }
            let pending = self.pending.as_mut().expect("a pending chunk exists");
            let take = (self.chunk - pending.bytes.len()).min(bytes.len());
            pending.bytes.extend_from_slice(&bytes[..take]);
            (bytes, offset) = (&bytes[take..], offset + take);
            if pending.bytes.len() >= self.chunk {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Hands the pending chunk to the writer thread.
    fn flush(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(chunk) if !chunk.bytes.is_empty() => {
                self.sender.send(chunk).map_err(|_| DimcutError::Io {
                    path: PathBuf::new(),
                    source: std::io::Error::other("the output writer thread stopped"),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Runs `work` while a dedicated thread performs its writes to `files`, so disk I/O (page-cache
/// copies, writeback) overlaps the arithmetic instead of alternating with it. Buffers in flight
/// stay within `background_buffer_bytes(chunk)`. A write error stops the run and is returned.
pub fn write_in_background<T>(
    files: &ShardFiles,
    chunk: usize,
    work: impl FnOnce(&mut Writes) -> Result<T>,
) -> Result<T> {
    std::thread::scope(|scope| {
        let (sender, receiver) = mpsc::sync_channel::<Chunk>(QUEUE_DEPTH);
        let (recycle, recycled) = mpsc::channel::<Vec<u8>>();
        let writer = scope.spawn(move || -> Result<()> {
            for chunk in receiver {
                files.write(chunk.shard, chunk.offset, &chunk.bytes)?;
                let _ = recycle.send(chunk.bytes);
            }
            Ok(())
        });
        let mut writes = Writes {
            sender,
            recycled,
            pending: None,
            chunk: chunk.max(1),
        };
        let result = work(&mut writes).and_then(|value| writes.flush().map(|()| value));
        drop(writes); // closes the queue: the writer drains it and stops
        let written = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // A failed write explains a failed hand-over, so it is the error to report.
        written?;
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::plan_layout;
    use crate::layout::tests::tensor;
    use safetensors::{Dtype, SafeTensors};

    #[test]
    fn background_writes_land_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = [
            tensor("a", Dtype::U8, &[100]),
            tensor("b", Dtype::U8, &[60]),
        ];
        let layout = plan_layout(&tensors, 100).unwrap();
        let files = ShardFiles::create(dir.path(), &layout, None).unwrap();
        let data: Vec<u8> = (0..160u8).collect();
        // Contiguous and out-of-order pieces, longer and shorter than a 7-byte chunk.
        let pieces = [(0, 30), (50, 100), (30, 50), (100, 103), (103, 160)];
        write_in_background(&files, 7, |writes| {
            for &(start, end) in &pieces {
                let (shard, base, first) = if start < 100 {
                    (layout.location[0].0, layout.location[0].1, 0)
                } else {
                    (layout.location[1].0, layout.location[1].1, 100)
                };
                writes.write(shard, base + start - first, &data[start..end])?;
            }
            Ok(())
        })
        .unwrap();
        files.finish().unwrap();
        for (i, shard) in layout.shards.iter().enumerate() {
            let bytes = std::fs::read(dir.path().join(&shard.file_name)).unwrap();
            let (n, _) = SafeTensors::read_metadata(&bytes).unwrap();
            let expected = if i == 0 { &data[..100] } else { &data[100..] };
            assert_eq!(&bytes[n + 8..], expected);
        }
    }
}
