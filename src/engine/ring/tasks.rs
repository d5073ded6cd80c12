//! Outgoing tasks on a ring (replication sends, read-through fetches):
//! the task table, the queue other threads submit to ([`TaskSubmitter`]),
//! connect, send (a file body by splice through the ring), receive, and a
//! pool of idle keep-alive connections per thread. What a request is and
//! how its response parses is [`crate::outgoing`], which knows no ring.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_uring::{
    Completion, Driver, IoBuf, Op, OpId, Pipe, PipePool, Returned, SharedFd, Token, Waker,
};

use super::{IDLE_TASK_CONNS_MAX, IDLE_TASK_CONN_MS, TASKS_PER_CORE_MAX};

/// Most of a task's file body one splice moves (file → pipe, then pipe →
/// socket). A splice runs on an io-wq worker at the priority of the ring's
/// thread, and with the kernel's voluntary preemption a public request that
/// wants the CPU it runs on waits until it ends: on loopback a 1 MiB splice
/// to a socket also runs the receiver's TCP processing and took about a
/// millisecond. Slices of 128 KiB bound that wait to about a tenth, for
/// twice the completions of 256 KiB (docs/replication.md).
pub const BODY_SLICE_BYTES: u64 = 128 * 1024;
use crate::engine::threads::StopSignal;
use crate::outgoing::{self, OutgoingRequest, Task, TaskError, TaskState, RESPONSE_READ_BYTES};

/// Submits outgoing tasks to the rings from any thread; see
/// [`super::RingEngine::submit_task`]. Once the engine stops, every submit is
/// given back.
#[derive(Clone)]
pub struct TaskSubmitter {
    pub(super) task_queues: Vec<std::sync::mpsc::SyncSender<OutgoingRequest>>,
    pub(super) wakers: Vec<Waker>,
    pub(super) next_core: Arc<std::sync::atomic::AtomicUsize>,
    pub(super) signal: Arc<StopSignal>,
    /// The background ring's queue and waker (`background.rs`): tasks with a
    /// file body go there first.
    pub(super) background: Option<(std::sync::mpsc::SyncSender<OutgoingRequest>, Waker)>,
}

impl outgoing::Submit for TaskSubmitter {
    /// Queue `request` on one of the rings (round robin); a full queue or a
    /// stopped engine gives it back.
    fn submit(&self, request: OutgoingRequest) -> Result<(), OutgoingRequest> {
        if self.task_queues.is_empty() || self.signal.stopping() {
            return Err(request);
        }
        // A body send is background work: its splices run on the background
        // ring's io-wq workers, in the background class. A full queue there
        // sends it from an engine ring rather than not at all.
        let request = match (&self.background, request.body_file.is_some()) {
            (Some((queue, waker)), true) => match queue.try_send(request) {
                Ok(()) => {
                    waker.wake();
                    return Ok(());
                }
                Err(
                    std::sync::mpsc::TrySendError::Full(r)
                    | std::sync::mpsc::TrySendError::Disconnected(r),
                ) => r,
            },
            _ => request,
        };
        let core = self.next_core.fetch_add(1, Ordering::Relaxed) % self.task_queues.len();
        match self.task_queues[core].try_send(request) {
            Ok(()) => {
                if let Some(waker) = self.wakers.get(core) {
                    waker.wake();
                }
                Ok(())
            }
            Err(
                std::sync::mpsc::TrySendError::Full(r)
                | std::sync::mpsc::TrySendError::Disconnected(r),
            ) => Err(r),
        }
    }
}

/// A keep-alive connection of a finished task, ready for the next task to
/// the same address.
struct IdleConn {
    addr: SocketAddr,
    fd: SharedFd,
    since: Instant,
}

/// A running task: its sans-IO state and what the ring holds for it.
struct TaskSlot {
    generation: u32,
    task: Task,
    fd: SharedFd,
    /// The connection came from the idle pool (no connect).
    reused: bool,
    /// The body file, when the body is spliced from a file.
    body_fd: Option<SharedFd>,
    /// Its pipe; `None` while an op holds it.
    pipe: Option<Pipe>,
    pending: Option<OpId>,
    timed_out: bool,
}

/// One engine thread's outgoing task client: the queue other threads
/// submit to, the table of running tasks, and idle keep-alive connections.
/// It owns no ring: the loop lends it the driver (and the pipe pool, for a
/// file body) for each call, so this file depends on nothing of the loop.
pub(super) struct TaskClient {
    rx: std::sync::mpsc::Receiver<OutgoingRequest>,
    slots: Vec<Option<TaskSlot>>,
    generation: u32,
    /// Idle keep-alive task connections, oldest first (bounded).
    idle_conns: VecDeque<IdleConn>,
    /// Shutdown phase 3: queued outgoing tasks are refused, not started.
    refuse_new: bool,
}

impl TaskClient {
    /// A client with room for TASKS_PER_CORE_MAX tasks, taking requests from `rx`.
    pub(super) fn new(rx: std::sync::mpsc::Receiver<OutgoingRequest>) -> TaskClient {
        TaskClient {
            rx,
            slots: (0..TASKS_PER_CORE_MAX).map(|_| None).collect(),
            generation: 1,
            idle_conns: VecDeque::new(),
            refuse_new: false,
        }
    }

    /// Shutdown phase 3: from now on queued tasks are refused, not started
    /// (their entries stay in the outbox).
    pub(super) fn refuse_new(&mut self) {
        self.refuse_new = true;
    }

    /// No task is running.
    pub(super) fn is_idle(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// Every tick: close idle pooled connections past their time, and
    /// cancel the operation of each task past its deadline (its completion
    /// then ends the task with `TimedOut`).
    pub(super) fn expire(&mut self, driver: &mut Driver, now: Instant) {
        let idle_max = Duration::from_millis(IDLE_TASK_CONN_MS);
        self.idle_conns
            .retain(|c| now.duration_since(c.since) < idle_max);
        for slot in self.slots.iter_mut().flatten() {
            if now >= slot.task.deadline && !slot.timed_out {
                slot.timed_out = true;
                if let Some(op) = slot.pending {
                    let _ = driver.cancel(op);
                }
            }
        }
    }

    /// The thread stops: every task still running or queued is answered
    /// `Refused` (replication keeps its entries in the outbox).
    pub(super) fn refuse_all(&mut self) {
        for slot in self.slots.iter_mut() {
            if let Some(t) = slot.take() {
                (t.task.request.done)(Err(TaskError::Refused));
            }
        }
        while let Ok(request) = self.rx.try_recv() {
            (request.done)(Err(TaskError::Refused));
        }
    }

    /// Start tasks from the queue while the task table has room; the rest
    /// wait in the (bounded) queue.
    pub(super) fn start_queued(&mut self, driver: &mut Driver, pipes: &mut PipePool) {
        if self.refuse_new {
            while let Ok(request) = self.rx.try_recv() {
                (request.done)(Err(TaskError::Refused));
            }
            return;
        }
        while let Some(index) = self.slots.iter().position(Option::is_none) {
            let Ok(request) = self.rx.try_recv() else {
                return;
            };
            self.start(driver, pipes, index as u32, request);
        }
    }

    fn start(
        &mut self,
        driver: &mut Driver,
        pipes: &mut PipePool,
        index: u32,
        request: OutgoingRequest,
    ) {
        // A file body needs its own fd (the op holds it) and a pipe for the
        // splices; without a free pipe the task is refused before anything
        // reaches the peer, and the caller tries again later.
        let body = match &request.body_file {
            None => None,
            Some(body) => {
                let file = Arc::clone(&body.file);
                let fd = Arc::try_unwrap(file)
                    .or_else(|shared| shared.try_clone())
                    .map(OwnedFd::from);
                match (fd, pipes.take()) {
                    (Ok(fd), Ok(pipe)) => Some((Rc::new(fd), pipe)),
                    _ => {
                        (request.done)(Err(TaskError::Refused));
                        return;
                    }
                }
            }
        };
        let pooled = if request.keep_alive {
            self.take_idle_conn(request.addr)
        } else {
            None
        };
        let reused = pooled.is_some();
        let fd = match pooled {
            Some(fd) => fd,
            None => {
                let family = if request.addr.is_ipv4() {
                    rustix::net::AddressFamily::INET
                } else {
                    rustix::net::AddressFamily::INET6
                };
                match rustix::net::socket_with(
                    family,
                    rustix::net::SocketType::STREAM,
                    // Non-blocking for the body's splices into it (`pump_body`).
                    rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
                    None,
                ) {
                    Ok(fd) => Rc::new(fd),
                    Err(errno) => {
                        (request.done)(Err(TaskError::Connect(errno.raw_os_error())));
                        return;
                    }
                }
            }
        };
        let addr = request.addr;
        self.generation = Token::next_generation(self.generation);
        let generation = self.generation;
        let mut task = Task::new(request, Instant::now());
        let op = if reused {
            task.state = TaskState::Sending;
            Self::send_op(Rc::clone(&fd), std::mem::take(&mut task.request.request), 0)
        } else {
            Op::Connect {
                fd: Rc::clone(&fd),
                addr,
            }
        };
        if let Some(entry) = self.slots.get_mut(index as usize) {
            *entry = Some(TaskSlot {
                generation,
                task,
                fd,
                reused,
                body_fd: body.as_ref().map(|(f, _)| Rc::clone(f)),
                pipe: body.map(|(_, p)| p),
                pending: None,
                timed_out: false,
            });
        }
        self.submit_op(driver, index, op);
    }

    /// An idle pooled connection to `addr` that is still open. The check is
    /// a non-blocking `MSG_PEEK`: no data and no EOF (`EAGAIN`) means open;
    /// a connection the peer closed while idle (EOF, an error, or stray
    /// bytes) is closed here, before anything is written to it, and the
    /// next one is tried.
    fn take_idle_conn(&mut self, addr: SocketAddr) -> Option<SharedFd> {
        while let Some(at) = self.idle_conns.iter().rposition(|c| c.addr == addr) {
            let conn = self.idle_conns.remove(at)?;
            let mut probe = [0u8; 1];
            match rustix::net::recv(
                &*conn.fd,
                &mut probe,
                rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
            ) {
                Err(rustix::io::Errno::AGAIN) => return Some(conn.fd),
                _ => continue,
            }
        }
        None
    }

    /// Keep a finished task's connection for the next task to its address.
    fn pool_idle_conn(&mut self, addr: SocketAddr, fd: SharedFd) {
        // Only a connection no op still holds can be pooled.
        if Rc::strong_count(&fd) != 1 {
            return;
        }
        if self.idle_conns.len() >= IDLE_TASK_CONNS_MAX {
            self.idle_conns.pop_front();
        }
        self.idle_conns.push_back(IdleConn {
            addr,
            fd,
            since: Instant::now(),
        });
    }

    /// Move the task's file body on: drain the pipe into the socket on this
    /// thread while it takes bytes, refill the pipe from the file through
    /// the ring (io-wq) once it is empty, and wait for the response once the
    /// body is out (or there is none).
    ///
    /// The drain is a non-blocking splice here, never a ring splice: a ring
    /// splice into a socket runs on an io-wq worker and blocks it while the
    /// peer does not read, and a ring has few workers
    /// ([`super::IOWQ_WORKERS_MAX`]). A peer that stopped reading (frozen,
    /// or with its receiving threads busy) then held every worker, and the
    /// other peers' sends waited behind it until its deadline, 30 s. Now a
    /// full socket waits for `POLLOUT` on the ring and holds nothing. One
    /// call moves at most what the pipe holds, one slice
    /// ([`BODY_SLICE_BYTES`]).
    fn pump_body(&mut self, driver: &mut Driver, index: u32) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let fd = Rc::clone(&slot.fd);
        let (Some(file_fd), Some(body), Some(pipe)) = (
            slot.body_fd.as_ref(),
            slot.task.request.body_file.as_ref(),
            slot.pipe.as_mut(),
        ) else {
            slot.task.state = TaskState::Receiving;
            return self.submit_op(driver, index, Self::recv_op(fd));
        };
        while pipe.held_bytes() > 0 {
            match pipe.drain_to(&*fd, pipe.held_bytes()) {
                Ok(n) if n > 0 => slot.task.body_sent += n as u64,
                Err(errno) if errno.0 == libc::EAGAIN || errno.0 == libc::EINTR => {
                    slot.task.state = TaskState::SplicingOut;
                    return self.submit_op(
                        driver,
                        index,
                        Op::PollAdd {
                            fd,
                            events: libc::POLLOUT as u32,
                        },
                    );
                }
                // The peer went away: the request cannot complete. A pipe
                // holding bytes is closed on drop, never reused.
                Ok(_) => return self.finish(index, Err(TaskError::Io(libc::EPIPE))),
                Err(errno) => return self.finish(index, Err(TaskError::Io(errno.0))),
            }
        }
        let remaining = body.len.saturating_sub(slot.task.body_sent);
        if remaining == 0 {
            slot.task.state = TaskState::Receiving;
            return self.submit_op(driver, index, Self::recv_op(fd));
        }
        let Some(pipe) = slot.pipe.take() else {
            return;
        };
        slot.task.state = TaskState::SplicingIn;
        let len = remaining
            .min(pipe.capacity_bytes() as u64)
            .min(BODY_SLICE_BYTES);
        let op = Op::SpliceToPipe {
            fd_in: Rc::clone(file_fd),
            offset_in: body.offset + slot.task.body_sent,
            pipe,
            len: u32::try_from(len).unwrap_or(u32::MAX),
        };
        self.submit_op(driver, index, op);
    }

    /// The send of the request's head (or in-memory body) from `offset` on.
    fn send_op(fd: SharedFd, buf: Vec<u8>, offset: usize) -> Op {
        Op::Send {
            fd,
            buf: IoBuf::Vec(buf),
            offset,
            flags: libc::MSG_NOSIGNAL,
        }
    }

    /// The read of a response's first (or next) bytes.
    fn recv_op(fd: SharedFd) -> Op {
        Op::Recv {
            fd,
            buf: IoBuf::Vec(Vec::with_capacity(RESPONSE_READ_BYTES)),
            flags: 0,
        }
    }

    fn submit_op(&mut self, driver: &mut Driver, index: u32, op: Op) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let token = Token::Task {
            slot: index,
            generation: slot.generation,
        };
        match driver.submit(op, token.pack()) {
            Ok(id) => slot.pending = Some(id),
            Err(_) => self.finish(index, Err(TaskError::Refused)),
        }
    }

    fn finish(&mut self, index: u32, outcome: Result<outgoing::OutgoingResponse, TaskError>) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::take) else {
            return;
        };
        let TaskSlot {
            task, fd, reused, ..
        } = slot;
        let outcome = match outcome {
            Ok(mut response) => {
                response.reused_connection = reused;
                if task.request.keep_alive && task.keeps_alive() {
                    self.pool_idle_conn(task.request.addr, fd);
                }
                Ok(response)
            }
            // The peer closed a pooled connection while it was idle and the
            // check before the write could not see it yet: no response byte
            // came back, so nothing says the request was even read.
            Err(err @ (TaskError::Io(_) | TaskError::BadResponse(_)))
                if reused && task.received.is_empty() =>
            {
                let errno = match err {
                    TaskError::Io(errno) => errno,
                    _ => 0,
                };
                Err(TaskError::StaleConnection(errno))
            }
            Err(err) => Err(err),
        };
        (task.request.done)(outcome);
    }

    /// An operation of task `index` completed: the handler of the task's
    /// state takes it, unless the task is gone (the generation differs) or
    /// past its deadline.
    pub(super) fn on_completion(
        &mut self,
        driver: &mut Driver,
        index: u32,
        generation: u32,
        completion: Completion,
    ) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        if slot.generation != generation {
            return;
        }
        slot.pending = None;
        if slot.timed_out {
            self.finish(index, Err(TaskError::TimedOut));
            return;
        }
        let result = completion.result.map(|n| n as usize).map_err(|e| e.0);
        match (slot.task.state, completion.resources) {
            (TaskState::Connecting, _) => self.on_connect(driver, index, result),
            (TaskState::Sending, Returned::Buf(IoBuf::Vec(buf))) => {
                self.on_send(driver, index, buf, result)
            }
            (TaskState::SplicingIn, Returned::Pipe(pipe)) => {
                self.on_splice_in(driver, index, pipe, result)
            }
            (TaskState::SplicingOut, _) => self.on_writable(driver, index, result),
            (TaskState::Receiving, Returned::Buf(IoBuf::Vec(buf))) => {
                self.on_recv(driver, index, buf, result)
            }
            _ => self.finish(index, Err(TaskError::Io(0))),
        }
    }

    /// The connection is made: send the request's head.
    fn on_connect(&mut self, driver: &mut Driver, index: u32, result: Result<usize, i32>) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let fd = Rc::clone(&slot.fd);
        match result {
            Ok(_) => {
                slot.task.state = TaskState::Sending;
                let buf = std::mem::take(&mut slot.task.request.request);
                self.submit_op(driver, index, Self::send_op(fd, buf, 0));
            }
            Err(errno) => self.finish(index, Err(TaskError::Connect(errno))),
        }
    }

    /// Part of the request's head (or in-memory body) went out: send the
    /// rest, then the file body, then wait for the response.
    fn on_send(
        &mut self,
        driver: &mut Driver,
        index: u32,
        buf: Vec<u8>,
        result: Result<usize, i32>,
    ) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let fd = Rc::clone(&slot.fd);
        match result {
            Ok(n) => {
                slot.task.sent += n;
                if slot.task.sent < buf.len() {
                    let offset = slot.task.sent;
                    self.submit_op(driver, index, Self::send_op(fd, buf, offset));
                } else {
                    slot.task.request.request = buf;
                    self.pump_body(driver, index);
                }
            }
            Err(errno) => self.finish(index, Err(TaskError::Io(errno))),
        }
    }

    /// A splice of the file body into the pipe finished: drain it into the
    /// socket.
    fn on_splice_in(
        &mut self,
        driver: &mut Driver,
        index: u32,
        pipe: Pipe,
        result: Result<usize, i32>,
    ) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        match result {
            Ok(n) if n > 0 => {
                slot.pipe = Some(pipe);
                self.pump_body(driver, index);
            }
            // The file ended early (cut behind the store's back): the
            // request cannot complete.
            Ok(_) => self.finish(index, Err(TaskError::Io(libc::EIO))),
            Err(errno) => self.finish(index, Err(TaskError::Io(errno))),
        }
    }

    /// The socket has room again (`POLLOUT`) for the bytes in the pipe.
    fn on_writable(&mut self, driver: &mut Driver, index: u32, result: Result<usize, i32>) {
        match result {
            Ok(_) | Err(libc::EINTR | libc::EAGAIN) => self.pump_body(driver, index),
            Err(errno) => self.finish(index, Err(TaskError::Io(errno))),
        }
    }

    /// Response bytes came in: finish the task once the response is whole,
    /// or receive more.
    fn on_recv(
        &mut self,
        driver: &mut Driver,
        index: u32,
        mut buf: Vec<u8>,
        result: Result<usize, i32>,
    ) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        match result {
            Ok(n) => {
                slot.task.received.extend_from_slice(&buf);
                let eof = n == 0;
                // The slot's own reference to the connection must be the
                // last for it to go back to the pool: no clone is held while
                // the task finishes.
                if let Some(outcome) = slot.task.response(eof) {
                    self.finish(index, outcome);
                } else if slot.task.received.len() > slot.task.request.response_bytes_max {
                    self.finish(
                        index,
                        Err(TaskError::BadResponse("response over the size bound")),
                    );
                } else {
                    buf.clear();
                    let fd = Rc::clone(&slot.fd);
                    self.submit_op(
                        driver,
                        index,
                        Op::Recv {
                            fd,
                            buf: IoBuf::Vec(buf),
                            flags: 0,
                        },
                    );
                }
            }
            Err(errno) => self.finish(index, Err(TaskError::Io(errno))),
        }
    }
}
