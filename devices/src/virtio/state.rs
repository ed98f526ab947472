//! Virtio state as it crosses the migration wire: plain data, versioned with the device.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

/// One virtqueue: its registers and where device and driver stand in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueueState {
    pub fn of(q: &Queue) -> QueueState {
        QueueState {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        }
    }

    /// The queue these numbers describe. Values the queue refuses (a state from another
    /// device, or corrupted) are an error naming the field.
    pub fn to_queue(&self) -> Result<Queue, String> {
        let mut q = Queue::new(self.max_size)
            .map_err(|e| format!("queue max size {}: {e:?}", self.max_size))?;
        q.try_set_size(self.size)
            .map_err(|e| format!("queue size {}: {e:?}", self.size))?;
        q.try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|e| format!("descriptor table {:#x}: {e:?}", self.desc_table))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|e| format!("available ring {:#x}: {e:?}", self.avail_ring))?;
        q.try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|e| format!("used ring {:#x}: {e:?}", self.used_ring))?;
        q.set_ready(self.ready);
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_event_idx(self.event_idx);
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_survives_its_state() {
        let mut q = Queue::new(256).unwrap();
        q.try_set_size(64).unwrap();
        q.try_set_desc_table_address(GuestAddress(0x10_0000))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(0x10_1000))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(0x10_2000))
            .unwrap();
        q.set_ready(true);
        q.set_next_avail(77);
        q.set_next_used(70);
        q.set_event_idx(true);
        let s = QueueState::of(&q);
        assert_eq!(QueueState::of(&s.to_queue().unwrap()), s);
        let bad = QueueState { size: 3, ..s };
        assert!(bad.to_queue().unwrap_err().contains("queue size 3"));
    }
}
