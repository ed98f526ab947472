//! The thread that serves an active virtio device's queues.
//!
//! It waits (with `event-manager`) on one eventfd per queue, which KVM signals when the
//! driver writes the queue's notification address (ioeventfd), and on a control eventfd.
//! Requests are served one queue at a time while holding the worker's state lock, so
//! [`QueueWorker::pause`] returns only once no request is half-done: from then on the
//! device writes nothing into guest RAM until [`QueueWorker::resume`]. That is what lets
//! the migration's final dirty collection be the last word on device writes.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::device::VirtioDevice;
use super::interrupt::VirtioInterrupt;
use super::state::QueueState;
use crate::guest_ram::GuestRam;

/// Event data for the control eventfd (queues use their index).
const CONTROL: u32 = u32::MAX;
/// Times a queue is looked at again for requests published while it was served, before
/// the worker lets go of its state and comes back through its own notification.
const MAX_ROUNDS: u32 = 4;

/// What the worker shares with the transport.
struct Shared {
    state: Mutex<WorkerState>,
    stop: AtomicBool,
}

struct WorkerState {
    queues: Vec<(u16, Queue)>,
    paused: bool,
}

/// Serves one device's queues on its own thread; stopped and joined on drop.
pub struct QueueWorker {
    shared: Arc<Shared>,
    control: EventFd,
    thread: Option<JoinHandle<()>>,
    name: String,
}

struct Subscriber {
    device: Arc<Mutex<dyn VirtioDevice>>,
    shared: Arc<Shared>,
    notifiers: Vec<(u16, EventFd)>,
    control: EventFd,
    ram: GuestRam,
    interrupt: Arc<VirtioInterrupt>,
}

impl QueueWorker {
    /// Starts serving `queues` (index, queue) of `device`; `notifiers[i]` is queue i's
    /// notification eventfd. Every queue is looked at once at start, so requests made
    /// before it (a migration's destination) are served.
    pub fn spawn(
        name: String,
        device: Arc<Mutex<dyn VirtioDevice>>,
        queues: Vec<(u16, Queue)>,
        notifiers: &[EventFd],
        ram: GuestRam,
        interrupt: Arc<VirtioInterrupt>,
    ) -> std::io::Result<QueueWorker> {
        let control = EventFd::new(libc::EFD_NONBLOCK)?;
        let mut fds = Vec::with_capacity(queues.len());
        for (i, _) in &queues {
            let fd = notifiers
                .get(usize::from(*i))
                .ok_or_else(|| std::io::Error::other(format!("no notifier for queue {i}")))?;
            fds.push((*i, fd.try_clone()?));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(WorkerState {
                queues,
                paused: false,
            }),
            stop: AtomicBool::new(false),
        });
        let sub = Subscriber {
            device,
            shared: shared.clone(),
            notifiers: fds,
            control: control.try_clone()?,
            ram,
            interrupt,
        };
        let mut em = EventManager::<Subscriber>::new().map_err(std::io::Error::other)?;
        let stop = shared.clone();
        let thread = ferry_seccomp::spawn(
            ferry_seccomp::ThreadKind::DeviceWorker,
            name.clone(),
            move || {
                em.add_subscriber(sub);
                while !stop.stop.load(Ordering::Acquire) {
                    if let Err(e) = em.run() {
                        log::error!("virtio worker event loop: {e}");
                        break;
                    }
                }
            },
        )?;
        let w = QueueWorker {
            shared,
            control,
            thread: Some(thread),
            name,
        };
        w.kick();
        Ok(w)
    }

    fn kick(&self) {
        if let Err(e) = self.control.write(1) {
            log::error!("{}: control eventfd: {e}", self.name);
        }
    }

    fn lock(&self) -> MutexGuard<'_, WorkerState> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the request being served to finish, then serves nothing until
    /// [`Self::resume`]. Notifications that arrive meanwhile are not lost: resume looks at
    /// every queue.
    pub fn pause(&self) {
        self.lock().paused = true;
    }

    pub fn resume(&self) {
        self.lock().paused = false;
        self.kick();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Where each queue stands (call paused, or the numbers move on).
    pub fn queue_states(&self) -> Vec<(u16, QueueState)> {
        self.lock()
            .queues
            .iter()
            .map(|(i, q)| (*i, QueueState::of(q)))
            .collect()
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.kick();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("{}: worker thread panicked", self.name);
            }
        }
    }
}

impl Subscriber {
    /// Serves queue `index` until the driver has nothing more for it.
    fn serve(&self, state: &mut WorkerState, index: u16) {
        let Some((_, queue)) = state.queues.iter_mut().find(|(i, _)| *i == index) else {
            return;
        };
        let mem = self.ram.queue_memory();
        let mut done = 0usize;
        // With EVENT_IDX the driver only notifies when it passes the index the device last
        // published: look again after re-enabling notifications, or a request made in
        // between would wait for the next one. A guest that keeps publishing must not keep
        // the state lock (pause and reset wait for it): after a few rounds the worker
        // notifies itself and lets go.
        let mut rounds = 0;
        loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            let (served, waits) = {
                let mut device = self.device.lock().unwrap_or_else(|p| p.into_inner());
                (
                    device.process_queue(index, queue, &self.ram),
                    device.buffers_wait_for_events(index),
                )
            };
            done += served;
            match queue.enable_notification(mem) {
                // An event queue's buffers are no work until the device has an event: it
                // wakes the worker then (otherwise this would spin on them).
                Ok(true) if waits && served == 0 => break,
                Ok(true) if rounds < MAX_ROUNDS => rounds += 1,
                Ok(true) => {
                    if let Some((_, fd)) = self.notifiers.iter().find(|(i, _)| *i == index) {
                        let _ = fd.write(1);
                    }
                    break;
                }
                _ => break,
            }
        }
        // The notification calls wrote the used ring's flags or avail_event through the
        // unlogged view; the lock is still held, so a pause finds this marked.
        self.ram.mark_used_ring(queue);
        if done > 0 && queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_queue(index);
        }
    }
}

impl MutEventSubscriber for Subscriber {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &EventFd, data: u32| {
            if let Err(e) = ops.add(Events::with_data(fd, data, EventSet::IN)) {
                log::error!("virtio worker: cannot watch fd {}: {e}", fd.as_raw_fd());
            }
        };
        add(&self.control, CONTROL);
        for (i, fd) in &self.notifiers {
            add(fd, u32::from(*i));
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if data == CONTROL {
            let _ = self.control.read();
            if self.shared.stop.load(Ordering::Acquire) || state.paused {
                return;
            }
            let all: Vec<u16> = state.queues.iter().map(|(i, _)| *i).collect();
            for i in all {
                self.serve(&mut state, i);
            }
            return;
        }
        if let Some((_, fd)) = self.notifiers.iter().find(|(i, _)| u32::from(*i) == data) {
            let _ = fd.read();
        }
        if !state.paused {
            self.serve(&mut state, data as u16);
        }
    }
}
