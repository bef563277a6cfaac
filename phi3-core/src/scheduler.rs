//! `Scheduler`: continuous batching of one model's sessions.
//!
//! A session never runs the model itself: each forward pass it needs (a decode step, or a prefill
//! chunk of at most `LoadOptions::prefill_chunk` tokens) is a [`Job`] handed to its model's scheduler, and the
//! calling thread blocks until the job's result (logits, or a greedy step's token) is back. Whichever waiting thread finds no step
//! running becomes the leader: it takes a batch of queued jobs from all sessions, runs them as one
//! forward pass (`Engine::forward`), posts every job's result and steps down; the next waiting
//! thread leads the next step (a panic in a step becomes an `Internal` error for its jobs, never a
//! hang). So there is no scheduler thread, hosts keep calling sessions from
//! their own threads, and sessions stay single-owner objects: batching shows only in speed.
//!
//! Batches (`State::take_batch`): every queued decode step (up to [`MAX_BATCH_SEQS`]) plus prefill
//! chunks up to the model's prefill chunk in tokens, higher session priority first, then arrival order. A
//! long prompt therefore advances one chunk per step alongside everyone's decode steps instead of
//! stalling them (chunked prefill). Jobs are never split: a sequence's pass is the one it would
//! run alone, and with the backends computing each row independently of the others
//! (`Backend::linear`), a session's results equal a solo run's.
//!
//! Before leading a step, the leader waits (a tenth of the last pass's time, within
//! [`BATCH_WAIT_MIN`]..=[`BATCH_WAIT_MAX`]) until the sessions expected back have a job queued:
//! every session that ran a decode step in one of the last two passes (and was not dropped
//! since), and as many jobs as sessions are inside a `generate`. Hosts that sample themselves
//! and call `append_tokens` one token at a time count through the first rule. They sample in parallel after each step and come back
//! at slightly different times (with more threads than cores, whole scheduler time slices
//! apart), and a step taken at the first arrival would split the batch. Scaling the wait with
//! the pass keeps its cost, paid when a session leaves, to a tenth of a step.
//!
//! KV memory: the leader reserves each job's blocks before the pass. A job the pool cannot serve
//! fails with `OutOfMemory`, or, when the model was loaded to wait, stays queued until a session
//! frees blocks (or its own session is cancelled).

use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::backend::{Backend, OutputKind, SeqOutput, GEMV_SPAN};
use crate::error::{Error, ErrorKind, Result};
use crate::forward::{Engine, SeqInput};
use crate::generate::CancelToken;
use crate::kv_cache::SeqKv;
use crate::rope::RopeRegime;

/// Most decode steps in one pass.
pub const MAX_BATCH_SEQS: usize = 256;
/// A leader waits for the sessions expected back at most a tenth of the last pass's time, and
/// at least this long...
pub const BATCH_WAIT_MIN: Duration = Duration::from_millis(2);
/// ...and at most this long.
pub const BATCH_WAIT_MAX: Duration = Duration::from_millis(50);
/// How often a thread whose job waits re-checks its session's cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// One sequence's forward pass, as a session hands it over.
pub(crate) struct Job {
    /// New tokens (ids already checked).
    pub(crate) tokens: Vec<u32>,
    /// The session's cache, moved in for the pass and handed back in [`JobOutput`].
    pub(crate) kv: SeqKv,
    pub(crate) regime: RopeRegime,
    /// Higher runs first when a step cannot take every queued job.
    pub(crate) priority: i32,
    /// Which session it is from (see [`Scheduler::session_ended`]).
    pub(crate) session: u64,
    /// The session's; a job still queued when it fires is dropped as `Cancelled`.
    pub(crate) cancel: CancelToken,
    /// What the pass hands back for its last position: logits or the greedy choice.
    pub(crate) output: OutputKind,
}

/// What a job gives back: the cache (grown on success, as it was on error) and what it asked
/// of its last position.
pub(crate) struct JobOutput {
    pub(crate) kv: SeqKv,
    pub(crate) result: Result<SeqOutput>,
}

/// Counts of the steps run so far (tests and benchmarks look at batch sizes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Forward passes run.
    pub steps: u64,
    /// Sequences over all passes (`sequences / steps` is the mean batch).
    pub sequences: u64,
    /// Largest number of sequences in one pass.
    pub max_batch: usize,
    /// Passes that ran prefill chunks and decode steps together.
    pub mixed_steps: u64,
}

/// One model's job queue and the state its threads share.
pub(crate) struct Scheduler {
    state: Mutex<State>,
    /// Signalled when results are posted, jobs queued, blocks freed or generations end.
    wake: Condvar,
    /// Whether a job the KV pool cannot serve waits instead of failing.
    wait_for_kv: bool,
}

struct Queued {
    id: u64,
    job: Job,
    /// `Some(e)`: the pool could not serve it at KV epoch `e`; runnable again once blocks are
    /// freed after that.
    blocked_at: Option<u64>,
}

#[derive(Default)]
struct State {
    queue: Vec<Queued>,
    done: HashMap<u64, JobOutput>,
    /// A thread is running a step.
    leading: bool,
    next_id: u64,
    /// Sessions inside a generation: they will queue another step soon.
    generating: usize,
    /// Passes run so far (the index of the next one).
    step_no: u64,
    /// Sessions that ran a decode step recently, with the index of the pass: they are likely to
    /// queue another one.
    recent_decoders: HashMap<u64, u64>,
    /// How long the last pass took.
    last_step: Duration,
    /// Bumped whenever sessions give blocks back.
    kv_epoch: u64,
    stats: SchedulerStats,
}

impl State {
    fn runnable(&self, q: &Queued) -> bool {
        q.blocked_at != Some(self.kv_epoch)
    }

    fn runnable_count(&self) -> usize {
        self.queue.iter().filter(|q| self.runnable(q)).count()
    }

    /// Remove and return the next batch (see the module docs), in priority then arrival order,
    /// with at most `prefill_budget` prefill tokens (one chunk always runs, whatever its size).
    fn take_batch(&mut self, prefill_budget: usize) -> Vec<Queued> {
        let mut order: Vec<usize> =
            (0..self.queue.len()).filter(|&i| self.runnable(&self.queue[i])).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(self.queue[i].job.priority), self.queue[i].id));
        let (mut decodes, mut prefill_tokens) = (0, 0);
        let mut chosen = Vec::new();
        for i in order {
            let n = self.queue[i].job.tokens.len();
            if n <= GEMV_SPAN {
                if decodes < MAX_BATCH_SEQS {
                    decodes += 1;
                    chosen.push(i);
                }
            } else if prefill_tokens == 0 || prefill_tokens + n <= prefill_budget {
                prefill_tokens += n;
                chosen.push(i);
            }
        }
        let mut slots: Vec<Option<Queued>> =
            std::mem::take(&mut self.queue).into_iter().map(Some).collect();
        let batch = chosen.iter().filter_map(|&i| slots[i].take()).collect();
        self.queue = slots.into_iter().flatten().collect();
        batch
    }
}

impl Scheduler {
    pub(crate) fn new(wait_for_kv: bool) -> Self {
        Scheduler { state: Mutex::new(State::default()), wake: Condvar::new(), wait_for_kv }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Steps run outside the lock and catch panics, so a poisoned lock holds consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A session entered a generation (it will queue steps back to back).
    pub(crate) fn generation_started(&self) {
        self.lock().generating += 1;
    }

    /// A session left its generation.
    pub(crate) fn generation_ended(&self) {
        let mut st = self.lock();
        st.generating = st.generating.saturating_sub(1);
        self.wake.notify_all();
    }

    /// Session `id` is gone: do not wait for its next step.
    pub(crate) fn session_ended(&self, id: u64) {
        let mut st = self.lock();
        if st.recent_decoders.remove(&id).is_some() {
            self.wake.notify_all();
        }
    }

    /// Sessions gave blocks back: jobs waiting for KV memory may run now.
    pub(crate) fn kv_freed(&self) {
        self.lock().kv_epoch += 1;
        self.wake.notify_all();
    }

    /// Steps run so far.
    pub(crate) fn stats(&self) -> SchedulerStats {
        self.lock().stats
    }

    /// Run `job` in a batch with whatever else is queued and return its result (see the module
    /// docs); blocks the calling thread, which may lead steps for other sessions meanwhile.
    pub(crate) fn run<B: Backend>(&self, engine: &Engine<B>, job: Job) -> JobOutput {
        let cancel = job.cancel.clone();
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.queue.push(Queued { id, job, blocked_at: None });
        self.wake.notify_all();
        loop {
            if let Some(out) = st.done.remove(&id) {
                return out;
            }
            if cancel.is_cancelled() {
                if let Some(at) = st.queue.iter().position(|q| q.id == id) {
                    let q = st.queue.remove(at);
                    let message = if q.blocked_at.is_some() {
                        "cancelled while waiting for KV memory"
                    } else {
                        "cancelled before its forward pass"
                    };
                    return JobOutput {
                        kv: q.job.kv,
                        result: Err(Error::new(ErrorKind::Cancelled, message)),
                    };
                }
            }
            if !st.leading && st.runnable_count() > 0 {
                st.leading = true;
                st = self.gather(st);
                let epoch = st.kv_epoch;
                // The prefill budget of a pass is one session's prefill chunk.
                let batch = st.take_batch(engine.prefill_chunk);
                drop(st);
                let decoders: Vec<u64> = batch
                    .iter()
                    .filter(|q| q.job.tokens.len() <= GEMV_SPAN)
                    .map(|q| q.job.session)
                    .collect();
                let mixed = !decoders.is_empty() && decoders.len() < batch.len();
                let ids: Vec<u64> = batch.iter().map(|q| q.id).collect();
                let step_started = Instant::now();
                // `step` catches panics in the forward pass itself; this catches the rest (a bug
                // in the bookkeeping), so that no waiting session is left without an answer. The
                // jobs' caches are lost then: their sessions start over from their tokens.
                let (outputs, requeue) =
                    panic::catch_unwind(AssertUnwindSafe(|| self.step(engine, batch, epoch)))
                        .unwrap_or_else(|_| {
                            let lost = |id| {
                                let result = Err(Error::internal("a scheduler step panicked"));
                                (id, JobOutput { kv: SeqKv::new(), result })
                            };
                            (ids.into_iter().map(lost).collect(), Vec::new())
                        });
                let step_time = step_started.elapsed();
                st = self.lock();
                if !outputs.is_empty() {
                    st.stats.steps += 1;
                    st.stats.sequences += outputs.len() as u64;
                    st.stats.max_batch = st.stats.max_batch.max(outputs.len());
                    st.stats.mixed_steps += u64::from(mixed);
                    let step_no = st.step_no;
                    st.recent_decoders.extend(decoders.iter().map(|&id| (id, step_no)));
                    st.recent_decoders.retain(|_, at| *at + 2 > step_no);
                    st.step_no += 1;
                    st.last_step = step_time;
                }
                st.done.extend(outputs);
                st.queue.extend(requeue);
                st.leading = false;
                self.wake.notify_all();
                continue;
            }
            st = self.wake.wait_timeout(st, CANCEL_POLL).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Wait (see the module docs for how long) until the sessions expected back have a step
    /// queued.
    fn gather<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let deadline = Instant::now() + (st.last_step / 10).clamp(BATCH_WAIT_MIN, BATCH_WAIT_MAX);
        loop {
            let runnable = st.runnable_count();
            let recent_queued = st
                .recent_decoders
                .keys()
                .all(|id| st.queue.iter().any(|q| q.job.session == *id && st.runnable(q)));
            if (recent_queued && runnable >= st.generating.max(1)) || runnable >= MAX_BATCH_SEQS {
                return st;
            }
            let now = Instant::now();
            if now >= deadline {
                return st;
            }
            st = self
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Reserve each job's KV blocks and run those that got them as one pass. Returns finished
    /// jobs' outputs and the jobs to queue again (waiting for KV memory freed after `epoch`).
    fn step<B: Backend>(
        &self,
        engine: &Engine<B>,
        batch: Vec<Queued>,
        epoch: u64,
    ) -> (Vec<(u64, JobOutput)>, Vec<Queued>) {
        let mut pool = engine.lock_pool();
        let (mut ready, mut outputs, mut requeue) = (Vec::new(), Vec::new(), Vec::new());
        for mut q in batch {
            let new_len = q.job.kv.len() + q.job.tokens.len();
            match pool.reserve(&engine.backend, &mut q.job.kv, new_len) {
                Ok(()) => ready.push(q),
                Err(e)
                    if self.wait_for_kv
                        && e.kind() == ErrorKind::OutOfMemory
                        && pool.could_ever_hold(new_len) =>
                {
                    q.blocked_at = Some(epoch);
                    requeue.push(q);
                }
                Err(e) => outputs.push((q.id, JobOutput { kv: q.job.kv, result: Err(e) })),
            }
        }
        if ready.is_empty() {
            return (outputs, requeue);
        }
        let result = {
            let mut inputs: Vec<SeqInput<'_>> = ready
                .iter_mut()
                .map(|q| SeqInput {
                    tokens: &q.job.tokens,
                    kv: &mut q.job.kv,
                    regime: q.job.regime,
                    output: q.job.output,
                })
                .collect();
            // A panic here is a bug; it must not leave `leading` set and every session stuck.
            panic::catch_unwind(AssertUnwindSafe(|| engine.forward(&mut inputs, &mut pool)))
                .unwrap_or_else(|_| Err(Error::internal("the forward pass panicked")))
        };
        match result {
            Ok(results) => {
                for (q, result) in ready.into_iter().zip(results) {
                    outputs.push((q.id, JobOutput { kv: q.job.kv, result: Ok(result) }));
                }
            }
            Err(e) => {
                for mut q in ready {
                    pool.trim(&mut q.job.kv);
                    let err = Error::new(e.kind(), e.to_string());
                    outputs.push((q.id, JobOutput { kv: q.job.kv, result: Err(err) }));
                }
            }
        }
        (outputs, requeue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(id: u64, tokens: usize, priority: i32) -> Queued {
        let job = Job {
            tokens: vec![0; tokens],
            kv: SeqKv::new(),
            regime: RopeRegime::Short,
            priority,
            session: id,
            cancel: CancelToken::new(),
            output: OutputKind::Logits,
        };
        Queued { id, job, blocked_at: None }
    }

    fn ids(batch: &[Queued]) -> Vec<u64> {
        batch.iter().map(|q| q.id).collect()
    }

    #[test]
    fn a_batch_takes_every_decode_step_and_prefill_up_to_the_budget() {
        let queue = || {
            vec![
                queued(0, 300, 0),
                queued(1, 1, 0),
                queued(2, 300, 0), // would pass the budget: next step
                queued(3, 4, 0),
                queued(4, 200, 0), // fits beside job 0
            ]
        };
        let mut st = State { queue: queue(), ..Default::default() };
        assert_eq!(ids(&st.take_batch(512)), [0, 1, 3, 4]);
        assert_eq!(ids(&st.take_batch(512)), [2]);
        assert!(st.take_batch(512).is_empty());
        // One chunk always runs, however long.
        st.queue = vec![queued(5, 2 * 512, 0), queued(6, 10, 0)];
        assert_eq!(ids(&st.take_batch(512)), [5]);
        // A model loaded with a larger prefill chunk takes all three prompts at once.
        let mut st = State { queue: queue(), ..Default::default() };
        assert_eq!(ids(&st.take_batch(1024)), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn priority_orders_prefill_and_blocked_jobs_wait_for_freed_blocks() {
        let queue = vec![queued(0, 400, 0), queued(1, 400, 5), queued(2, 1, -1)];
        let mut st = State { queue, ..Default::default() };
        assert_eq!(ids(&st.take_batch(512)), [1, 2]);
        let mut blocked = queued(3, 1, 0);
        blocked.blocked_at = Some(st.kv_epoch);
        st.queue.push(blocked);
        assert_eq!(ids(&st.take_batch(512)), [0]);
        assert_eq!(st.runnable_count(), 0);
        st.kv_epoch += 1;
        assert_eq!(ids(&st.take_batch(512)), [3]);
    }
}
