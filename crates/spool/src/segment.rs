//! Segment files: the spool's on-disk form.
//!
//! A segment file is named after the sequence of its first record (`00000000000000000042.seg`)
//! and holds records framed as `[u32 length][u32 crc32][encoded OpRecord]`, appended in order.
//! Recovery reads frames until the end or the first frame that is cut short or fails its
//! checksum (a write torn by a crash), and truncates the file there.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use doppel_proto::OpRecord;
use doppel_proto::frame::{HEADER_LEN, check_payload, header_for, parse_header};

/// Largest record accepted when reading back (a corrupt length must not allocate gigabytes).
const MAX_RECORD: u32 = 64 * 1024 * 1024;

/// An open segment file.
#[derive(Debug)]
pub struct SegmentFile {
    /// Where it is.
    pub path: PathBuf,
    file: File,
    /// Offset of each record's frame header.
    pub offsets: Vec<u64>,
    /// Length of each record's payload.
    pub lens: Vec<u32>,
    /// Capture time of each record (kept in memory for lag reporting).
    pub times: Vec<u64>,
    /// Bytes in the file.
    pub end: u64,
}

/// File name for a segment starting at `first`.
pub fn name_for(first: u64) -> String {
    format!("{first:020}.seg")
}

/// The first sequence encoded in a segment file name, if it is one.
pub fn parse_name(name: &str) -> Option<u64> {
    name.strip_suffix(".seg")?.parse().ok()
}

impl SegmentFile {
    /// Creates a new, empty segment file.
    pub fn create(dir: &Path, first: u64) -> io::Result<SegmentFile> {
        let path = dir.join(name_for(first));
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        Ok(SegmentFile { path, file, offsets: Vec::new(), lens: Vec::new(), times: Vec::new(), end: 0 })
    }

    /// Makes the acknowledged segment file at `spare` the new, empty segment starting at
    /// `first`, to be written over from its start. Its old records stay behind the end until
    /// overwritten; every one has a lower sequence than `first`, so recovery stops at the
    /// first of them.
    pub fn reuse(spare: &Path, dir: &Path, first: u64) -> io::Result<SegmentFile> {
        let path = dir.join(name_for(first));
        std::fs::rename(spare, &path)?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(SegmentFile { path, file, offsets: Vec::new(), lens: Vec::new(), times: Vec::new(), end: 0 })
    }

    /// Appends one encoded record.
    pub fn append(&mut self, rec: &[u8], time_us: u64) -> io::Result<()> {
        let mut buf = Vec::with_capacity(HEADER_LEN + rec.len());
        buf.extend_from_slice(&header_for(rec));
        buf.extend_from_slice(rec);
        self.file.write_all_at(&buf, self.end)?;
        self.offsets.push(self.end);
        self.lens.push(rec.len() as u32);
        self.times.push(time_us);
        self.end += buf.len() as u64;
        Ok(())
    }

    /// Reads records `from..to` (indexes within this segment) with one read.
    pub fn read_range(&self, from: usize, to: usize) -> io::Result<Vec<Bytes>> {
        if from >= to {
            return Ok(Vec::new());
        }
        let start = self.offsets[from];
        let stop = if to < self.offsets.len() { self.offsets[to] } else { self.end };
        let mut buf = vec![0u8; (stop - start) as usize];
        self.file.read_exact_at(&mut buf, start)?;
        let buf = Bytes::from(buf);
        Ok((from..to)
            .map(|i| {
                let at = (self.offsets[i] - start) as usize + HEADER_LEN;
                buf.slice(at..at + self.lens[i] as usize)
            })
            .collect())
    }

    /// Forces the file's contents to disk.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Opens an existing segment and reads its frame index, truncating a torn tail. Returns
    /// the segment and the sequence numbers of its records (checked to be consecutive from the
    /// name's sequence; reading stops at the first that is not).
    pub fn recover(path: &Path, first: u64) -> io::Result<SegmentFile> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        let mut seg = SegmentFile {
            path: path.to_path_buf(),
            file: file.try_clone()?,
            offsets: Vec::new(),
            lens: Vec::new(),
            times: Vec::new(),
            end: 0,
        };
        file.seek(SeekFrom::Start(0))?;
        let mut reader = io::BufReader::with_capacity(1 << 20, &mut file);
        let mut pos = 0u64;
        let mut stale = false;
        loop {
            let mut header = [0u8; HEADER_LEN];
            if pos + HEADER_LEN as u64 > len || reader.read_exact(&mut header).is_err() {
                break;
            }
            let Ok((rlen, crc)) = parse_header(&header, MAX_RECORD) else { break };
            if pos + (HEADER_LEN as u64) + rlen as u64 > len {
                break;
            }
            let mut payload = vec![0u8; rlen as usize];
            if reader.read_exact(&mut payload).is_err() || check_payload(&payload, crc).is_err() {
                break;
            }
            let Ok(rec) = OpRecord::decode(&payload) else { break };
            if rec.seq != first + seg.offsets.len() as u64 {
                // A recycled segment's old records (lower sequences) after the new ones.
                stale = rec.seq < first;
                break;
            }
            seg.offsets.push(pos);
            seg.lens.push(rlen);
            seg.times.push(rec.time_us);
            pos += HEADER_LEN as u64 + rlen as u64;
        }
        drop(reader);
        if pos < len {
            if stale {
                tracing::debug!(segment = %path.display(), kept = pos, size = len, "recycled spool segment: old records after the end dropped");
            } else {
                tracing::warn!(segment = %path.display(), kept = pos, size = len, "spool segment has a torn tail; truncating");
            }
            seg.file.set_len(pos)?;
        }
        seg.end = pos;
        Ok(seg)
    }
}
