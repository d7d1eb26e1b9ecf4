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
