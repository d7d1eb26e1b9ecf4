//! Replica listings on their way from the link to the capture thread, a chunk at a time.
//!
//! A listing of a replica with millions of names is never held whole: the link task passes
//! each chunk the target sends through a small bounded channel, and the capture thread seeds
//! its index (or a verify's) from it as it comes. The channel's bound carries the
//! back-pressure to the target, whose listing waits for room (see the target's list budget).

use doppel_proto::{Entry, Message};
use tokio::sync::mpsc;

use crate::error::AgentError;

/// Chunks in flight between the link task and the capture thread.
const IN_FLIGHT: usize = 4;

/// One step of a listing.
enum Part {
    Entries(Vec<Entry>),
    /// The listing is complete (`None`) or failed (the target's reason).
    End(Option<String>),
}

/// The link's end: feeds what the target sends.
pub struct ListingFeed(mpsc::Sender<Part>);

/// The capture thread's end.
pub struct Listing {
    rx: mpsc::Receiver<Part>,
    chunk: std::vec::IntoIter<Entry>,
    /// How it ended: `Some(Ok)` complete, `Some(Err)` failed; `None` while it runs.
    ended: Option<Result<(), String>>,
}

/// A listing's two ends.
pub fn channel() -> (ListingFeed, Listing) {
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    (ListingFeed(tx), Listing { rx, chunk: Vec::new().into_iter(), ended: None })
}

impl Listing {
    /// A listing already complete (tests, and lists gathered whole).
    pub fn of(entries: Vec<Entry>) -> Listing {
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        Listing { rx, chunk: entries.into_iter(), ended: Some(Ok(())) }
    }

    /// Once the entries are exhausted: whether the listing was complete. A listing the target
    /// could not finish, or that a broken link cut short, is an error: comparing with part of
    /// a replica would call the rest missing.
    pub fn finish(mut self) -> Result<(), AgentError> {
        // Whatever was not consumed still counts: drain to the end marker.
        while self.next().is_some() {}
        match self.ended {
            Some(Ok(())) => Ok(()),
            Some(Err(reason)) => Err(AgentError::Listing(reason)),
            None => Err(AgentError::Listing("the link closed before the listing ended".into())),
        }
    }
}

impl Iterator for Listing {
    type Item = Entry;

    /// The next entry (blocking: call from the capture thread, never from the runtime).
    fn next(&mut self) -> Option<Entry> {
        loop {
            if let Some(e) = self.chunk.next() {
                return Some(e);
            }
            if self.ended.is_some() {
                return None;
            }
            match self.rx.blocking_recv() {
                Some(Part::Entries(v)) => self.chunk = v.into_iter(),
                Some(Part::End(error)) => self.ended = Some(error.map_or(Ok(()), Err)),
                None => {
                    self.ended = Some(Err("the link closed before the listing ended".into()));
                }
            }
        }
    }
}

/// Why forwarding stopped.
#[derive(Debug)]
pub enum FeedError {
    /// The link's message stream ended.
    Closed,
    /// The target could not make the listing.
    Target(String),
}

impl ListingFeed {
    /// Forwards the messages of listing `id` from `lists` until its end. Entries of other
    /// listings (abandoned earlier) are skipped. The capture thread may stop reading (it
    /// failed): the rest is then drained and dropped.
    pub async fn forward(self, lists: &mut mpsc::Receiver<Message>, id: u64) -> Result<(), FeedError> {
        loop {
            match lists.recv().await.ok_or(FeedError::Closed)? {
                Message::ListEntries { id: i, entries } if i == id => {
                    let _ = self.0.send(Part::Entries(entries)).await;
                }
                Message::ListEnd { id: i, error } if i == id => {
                    let _ = self.0.send(Part::End(error.clone())).await;
                    return error.map_or(Ok(()), |e| Err(FeedError::Target(e)));
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_proto::{EntryKind, RelPath, Timestamp};

    fn entry(name: &str) -> Entry {
        Entry {
            path: RelPath::new(name).unwrap().to_wire(),
            kind: EntryKind::File,
            size: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            link_target: vec![],
            link_group: None,
            first_block: 0,
            blocks: vec![],
            xattrs: vec![],
            vouched: false,
        }
    }

    fn names(l: &mut Listing) -> Vec<String> {
        l.by_ref().map(|e| e.path.display()).collect()
    }

    #[test]
    fn chunks_arrive_in_order_and_a_complete_listing_finishes() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (feed, mut listing) = channel();
        let (tx, mut rx) = mpsc::channel(16);
        let reader = std::thread::spawn(move || {
            let got = names(&mut listing);
            (got, listing.finish())
        });
        rt.block_on(async {
            tx.send(Message::ListEntries { id: 1, entries: vec![entry("stale")] }).await.unwrap();
            for n in ["a", "b"] {
                tx.send(Message::ListEntries { id: 2, entries: vec![entry(n)] }).await.unwrap();
            }
            tx.send(Message::ListEnd { id: 2, error: None }).await.unwrap();
            feed.forward(&mut rx, 2).await.unwrap();
        });
        let (got, end) = reader.join().unwrap();
        assert_eq!(got, ["a", "b"]);
        end.unwrap();
    }

    #[test]
    fn a_failed_or_cut_listing_is_an_error() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for cut in [false, true] {
            let (feed, mut listing) = channel();
            let (tx, mut rx) = mpsc::channel(16);
            let reader = std::thread::spawn(move || {
                let got = names(&mut listing);
                (got, listing.finish())
            });
            let fed = rt.block_on(async move {
                tx.send(Message::ListEntries { id: 7, entries: vec![entry("a")] }).await.unwrap();
                if !cut {
                    tx.send(Message::ListEnd { id: 7, error: Some("disk on fire".into()) }).await.unwrap();
                }
                drop(tx);
                feed.forward(&mut rx, 7).await
            });
            let (got, end) = reader.join().unwrap();
            assert_eq!(got, ["a"]);
            let msg = end.unwrap_err().to_string();
            if cut {
                assert!(matches!(fed, Err(FeedError::Closed)));
                assert!(msg.contains("link closed"), "{msg}");
            } else {
                assert!(matches!(fed, Err(FeedError::Target(_))));
                assert!(msg.contains("disk on fire"), "{msg}");
            }
        }
    }
}
