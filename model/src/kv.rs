//! Bookkeeping of the paged KV cache: fixed-size blocks with reference counts.
//!
//! A sequence is a list of block ids (its block table). Forking a sequence copies the table and
//! bumps each block's count, so children share every block of their parent; the engine copies a
//! block only when a sequence appends into a *shared, partly filled* block (copy-on-write). The
//! storage itself belongs to the backend; this module never touches it.

use crate::error::{ModelError, Result};

/// Tokens per KV block.
pub const KV_BLOCK_TOKENS: usize = 16;

/// Hands out block ids up to a limit and counts their owners.
#[derive(Debug)]
pub(crate) struct BlockAllocator {
    /// Owners of each block ever handed out; 0 means free.
    refcount: Vec<u32>,
    /// Ids with a zero count, reused before new ids are minted.
    free: Vec<u32>,
    /// Most blocks that may exist at once.
    limit: usize,
}

impl BlockAllocator {
    pub(crate) fn new(limit: usize) -> Self {
        BlockAllocator {
            refcount: Vec::new(),
            free: Vec::new(),
            limit,
        }
    }

    /// Blocks that could still be allocated.
    pub(crate) fn available(&self) -> usize {
        self.free.len() + (self.limit - self.refcount.len())
    }

    /// Blocks currently owned by at least one sequence.
    pub(crate) fn in_use(&self) -> usize {
        self.refcount.len() - self.free.len()
    }

    /// Highest id handed out so far, plus one: the storage the backend must provide.
    pub(crate) fn high_water(&self) -> usize {
        self.refcount.len()
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn alloc(&mut self) -> Result<u32> {
        if let Some(id) = self.free.pop() {
            debug_assert_eq!(self.refcount[id as usize], 0);
            self.refcount[id as usize] = 1;
            return Ok(id);
        }
        if self.refcount.len() >= self.limit {
            return Err(ModelError::KvCacheFull {
                needed: 1,
                limit: self.limit,
                block_size: KV_BLOCK_TOKENS,
            });
        }
        self.refcount.push(1);
        Ok((self.refcount.len() - 1) as u32)
    }

    pub(crate) fn retain(&mut self, id: u32) {
        let c = &mut self.refcount[id as usize];
        assert!(*c > 0, "retain of free KV block {id}");
        *c += 1;
    }

    pub(crate) fn release(&mut self, id: u32) {
        let c = &mut self.refcount[id as usize];
        assert!(*c > 0, "double release of KV block {id}");
        *c -= 1;
        if *c == 0 {
            self.free.push(id);
        }
    }

    pub(crate) fn is_shared(&self, id: u32) -> bool {
        self.refcount[id as usize] > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_to_limit_and_reuses_freed_ids() {
        let mut a = BlockAllocator::new(2);
        let x = a.alloc().unwrap();
        let y = a.alloc().unwrap();
        assert!(matches!(
            a.alloc(),
            Err(ModelError::KvCacheFull { limit: 2, .. })
        ));
        a.retain(x);
        assert!(a.is_shared(x));
        a.release(x);
        a.release(x);
        assert_eq!(a.in_use(), 1);
        assert_eq!(a.alloc().unwrap(), x);
        assert_ne!(x, y);
        assert_eq!(a.available(), 0);
    }
}
