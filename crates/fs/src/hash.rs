//! Per-block hashes of file contents.

use std::fs::File;
use std::io::{self, Read};

use doppel_proto::{BLOCK_SIZE, BlockHash, hash_block};

/// Reads `file` from the start in blocks of [`BLOCK_SIZE`] and calls `f(index, data, hash)` for
/// each (the last block may be short). Returns the number of bytes read, which is the file's
/// size as seen by this pass: a file that grows or shrinks meanwhile is hashed as read, and the
/// watch that reported the change will report the later one too.
pub fn for_each_block(
    file: &mut File,
    mut f: impl FnMut(u64, &[u8], &BlockHash) -> io::Result<()>,
) -> io::Result<u64> {
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut index = 0u64;
    let mut total = 0u64;
    loop {
        let n = read_full(file, &mut buf)?;
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        let h = hash_block(data);
        f(index, data, &h)?;
        total += n as u64;
        index += 1;
        if n < buf.len() {
            break;
        }
    }
    Ok(total)
}

/// Hashes every block of `file`.
pub fn hash_file(file: &mut File) -> io::Result<(Vec<BlockHash>, u64)> {
    let mut hashes = Vec::new();
    let size = for_each_block(file, |_, _, h| {
        hashes.push(*h);
        Ok(())
    })?;
    Ok((hashes, size))
}

/// Hashes blocks `first..first + count` of `file` (of `size` bytes; blocks past the end are
/// not there), calling `f` with each hash in order. Blocks that lie wholly in a hole are not
/// read: their hash is that of zeros, the same as reading them would give. So the work is
/// proportional to the data the file really holds, and a sparse file of a terabyte (one
/// `truncate` away for any source) costs a loop over its block numbers, not a terabyte of
/// reading and hashing.
pub fn hash_blocks_sparse(
    file: &File,
    size: u64,
    first: u64,
    count: u64,
    mut f: impl FnMut(BlockHash) -> io::Result<()>,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let bs = BLOCK_SIZE;
    let mut buf = vec![0u8; bs as usize];
    let mut data = Segment::default();
    for i in first..first.saturating_add(count) {
        let at = i * bs;
        if at >= size {
            break;
        }
        let n = bs.min(size - at) as usize;
        if at >= data.end {
            data = Segment::next(file, at, size)?;
        }
        if data.start >= at + n as u64 {
            f(zero_hash(n))?;
        } else {
            file.read_exact_at(&mut buf[..n], at)?;
            f(hash_block(&buf[..n]))?;
        }
    }
    Ok(())
}

/// The next stretch of data at or after an offset, as `SEEK_DATA`/`SEEK_HOLE` report it.
#[derive(Default)]
struct Segment {
    start: u64,
    end: u64,
}

impl Segment {
    fn next(file: &File, at: u64, size: u64) -> io::Result<Segment> {
        use rustix::fs::SeekFrom;
        match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(start) => Ok(Segment { start, end: rustix::fs::seek(file, SeekFrom::Hole(start))? }),
            // No data after `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => Ok(Segment { start: size, end: u64::MAX }),
            // A file system without hole reporting: everything is data.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                Ok(Segment { start: 0, end: u64::MAX })
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The hash of `n` zero bytes (a full block's is computed once).
fn zero_hash(n: usize) -> BlockHash {
    static FULL: std::sync::OnceLock<BlockHash> = std::sync::OnceLock::new();
    if n == BLOCK_SIZE as usize {
        *FULL.get_or_init(|| hash_block(&vec![0u8; n]))
    } else {
        hash_block(&vec![0u8; n])
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
pub fn read_full(file: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sparse_hashing_equals_reading_everything() {
        use std::os::unix::fs::FileExt;
        let bs = BLOCK_SIZE;
        let f = tempfile::tempfile().unwrap();
        // Data, a hole of several blocks, data straddling a block boundary, a hole to a
        // short tail.
        f.write_all_at(&[1u8; 5000], 10).unwrap();
        f.write_all_at(&[2u8; 3000], 5 * bs - 1000).unwrap();
        let size = 9 * bs + 77;
        f.set_len(size).unwrap();
        let mut read_all = Vec::new();
        for_each_block(&mut f.try_clone().unwrap(), |_, _, h| {
            read_all.push(*h);
            Ok(())
        })
        .unwrap();
        let mut sparse = Vec::new();
        hash_blocks_sparse(&f, size, 0, u64::MAX, |h| {
            sparse.push(h);
            Ok(())
        })
        .unwrap();
        assert_eq!(sparse, read_all);
        let mut middle = Vec::new();
        hash_blocks_sparse(&f, size, 3, 4, |h| {
            middle.push(h);
            Ok(())
        })
        .unwrap();
        assert_eq!(middle, read_all[3..7]);
    }

    #[test]
    fn a_terabyte_hole_is_hashed_without_reading_it() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 40).unwrap();
        let started = std::time::Instant::now();
        let mut n = 0u64;
        hash_blocks_sparse(&f, 1 << 40, 0, u64::MAX, |h| {
            assert_eq!(h, zero_hash(BLOCK_SIZE as usize));
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, (1 << 40) / BLOCK_SIZE);
        // Reading 1 TiB would take many minutes; 16 million loop turns take well under this.
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "{:?}", started.elapsed());
    }

    #[test]
    fn hashes_blocks_with_short_tail() {
        let mut t = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(BLOCK_SIZE as usize * 2 + 10)).map(|i| (i % 251) as u8).collect();
        t.write_all(&data).unwrap();
        use std::io::Seek;
        t.rewind().unwrap();
        let (h, size) = hash_file(&mut t).unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(h.len(), 3);
        assert_eq!(h[2], hash_block(&data[2 * BLOCK_SIZE as usize..]));
        assert_eq!(h[0], hash_block(&data[..BLOCK_SIZE as usize]));
    }
}
