//! [`Chunked`]: an append-only sequence kept in fixed-size chunks.
//!
//! A log's entries only ever grow. In a `Vec` each doubling allocates twice
//! the memory and copies everything: at a million entries that is a 150 MB
//! allocation and a 70 MB copy in one call, paid by whichever append crosses
//! the boundary (on the server, the task every connection waits on). Replicas
//! fed the same stream cross the same boundaries at the same change, so a
//! process holding many of them (the W3 fan-out benchmark's thousand
//! subscribers) stalled for 0.1–0.4 s at the 512th and 1,024th change while
//! the kernel zeroed the fresh pages. Fixed chunks allocate the same small
//! amount every [`CHUNK`] appends and never move an element.
//!
//! Chunks are shared (`Arc`): a clone costs a reference count per chunk, not
//! a copy of the elements, so the server can hand a cold sync's reply a
//! snapshot of the log and encode it elsewhere. Appending to a last chunk
//! that a clone still holds copies that one chunk (at most [`CHUNK`]
//! elements) first.

use std::sync::Arc;

/// Elements per chunk: 64 entries of a log are about 4.6 KB, an allocation
/// the allocator serves from pages it already holds.
pub const CHUNK: usize = 64;

/// An append-only sequence in chunks of [`CHUNK`] elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunked<T> {
    chunks: Vec<Arc<Vec<T>>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Chunked<T> {
    /// An empty sequence.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many elements it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element at `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<&T> {
        self.chunks.get(index / CHUNK)?.get(index % CHUNK)
    }

    /// The elements in order.
    pub fn iter(&self) -> Iter<'_, T> {
        let chunk: ChunkIter<'_, T> = |c| c.iter();
        Iter {
            inner: self.chunks.iter().flat_map(chunk),
            left: self.len,
        }
    }
}

impl<T: Clone> Chunked<T> {
    /// Append one element.
    pub fn push(&mut self, value: T) {
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => Arc::make_mut(last).push(value),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(value);
                self.chunks.push(Arc::new(chunk));
            }
        }
        self.len += 1;
    }

    /// Take the first `n` elements (all of them if fewer) out, in order.
    pub fn take_front(&mut self, n: usize) -> Chunked<T> {
        let mut all = std::mem::take(self).into_iter();
        let front = all.by_ref().take(n).collect();
        self.extend(all);
        front
    }

    /// Keep only the elements `keep` accepts, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let all = std::mem::take(self);
        self.extend(all.into_iter().filter(|v| keep(v)));
    }
}

impl<T: Clone> Extend<T> for Chunked<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        for v in iter {
            self.push(v);
        }
    }
}

impl<T: Clone> FromIterator<T> for Chunked<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut out = Chunked::new();
        out.extend(iter);
        out
    }
}

/// A chunk's elements, moved out when no clone shares it, copied otherwise.
type OwnedChunk<T> = fn(Arc<Vec<T>>) -> Vec<T>;

impl<T: Clone> IntoIterator for Chunked<T> {
    type Item = T;
    type IntoIter = std::iter::FlatMap<std::vec::IntoIter<Arc<Vec<T>>>, Vec<T>, OwnedChunk<T>>;

    fn into_iter(self) -> Self::IntoIter {
        let owned: OwnedChunk<T> = Arc::unwrap_or_clone;
        self.chunks.into_iter().flat_map(owned)
    }
}

impl<'a, T> IntoIterator for &'a Chunked<T> {
    type Item = &'a T;
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// A chunk's elements, borrowed.
type ChunkIter<'a, T> = fn(&'a Arc<Vec<T>>) -> std::slice::Iter<'a, T>;

/// The elements of a [`Chunked`] in order (it knows how many are left).
#[derive(Debug, Clone)]
pub struct Iter<'a, T> {
    inner: std::iter::FlatMap<
        std::slice::Iter<'a, Arc<Vec<T>>>,
        std::slice::Iter<'a, T>,
        ChunkIter<'a, T>,
    >,
    left: usize,
}

impl<'a, T> Iterator for Iter<'a, T> {
    type Item = &'a T;

    fn next(&mut self) -> Option<&'a T> {
        let v = self.inner.next()?;
        self.left -= 1;
        Some(v)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<T> ExactSizeIterator for Iter<'_, T> {}

impl<T> DoubleEndedIterator for Iter<'_, T> {
    fn next_back(&mut self) -> Option<Self::Item> {
        let v = self.inner.next_back()?;
        self.left -= 1;
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Behaves as a `Vec` would, across chunk boundaries.
        #[test]
        fn matches_a_vec(values in proptest::collection::vec(any::<u16>(), 0..300), cut in any::<u16>(), front in 0usize..320) {
            let mut c = Chunked::new();
            for v in &values {
                c.push(*v);
            }
            prop_assert_eq!(c.len(), values.len());
            prop_assert_eq!(c.is_empty(), values.is_empty());
            prop_assert_eq!(c.iter().len(), values.len());
            prop_assert_eq!(c.iter().copied().collect::<Vec<_>>(), values.clone());
            prop_assert_eq!(c.iter().rev().copied().collect::<Vec<_>>(), values.iter().rev().copied().collect::<Vec<_>>());
            for (i, v) in values.iter().enumerate() {
                prop_assert_eq!(c.get(i), Some(v));
            }
            prop_assert_eq!(c.get(values.len()), None);
            // A clone shares the chunks; appending to either leaves the other as it was.
            let mut shared = c.clone();
            shared.push(7);
            prop_assert_eq!(shared.len(), values.len() + 1);
            prop_assert_eq!(c.iter().copied().collect::<Vec<_>>(), values.clone());
            c.push(9);
            prop_assert_eq!(shared.iter().next_back(), Some(&7));
            prop_assert_eq!(c.iter().next_back(), Some(&9));
            drop(shared);
            c = values.iter().copied().collect();
            c.retain(|v| *v < cut);
            let kept: Vec<u16> = values.iter().copied().filter(|v| *v < cut).collect();
            prop_assert_eq!(c.len(), kept.len());
            prop_assert_eq!(c.clone().into_iter().collect::<Vec<_>>(), kept.clone());
            prop_assert_eq!(&c, &kept.iter().copied().collect::<Chunked<_>>());
            let taken = c.take_front(front);
            let n = front.min(kept.len());
            prop_assert_eq!(taken.len(), n);
            prop_assert_eq!(taken.iter().copied().collect::<Vec<_>>(), kept[..n].to_vec());
            prop_assert_eq!(c.len(), kept.len() - n);
            prop_assert_eq!(c.iter().copied().collect::<Vec<_>>(), kept[n..].to_vec());
            for (i, v) in kept[n..].iter().enumerate() {
                prop_assert_eq!(c.get(i), Some(v));
            }
        }
    }
}
