//! Parallel loops of the kernels: [`for_each`] runs `f(0)`, …, `f(n - 1)` over the thread
//! pool. Inside [`with_team`] (a decode step's forward pass) the pool's other threads stay
//! on the pass and spin between its loops instead of going to sleep: a decode step is ~100
//! short loops, and rayon's hand-off (a yield loop, then a sleep and a wake-up) costs a
//! noticeable share of each. Outside a team a loop goes to rayon as before.
//!
//! Which thread computes which index never changes a result: every loop's items write
//! disjoint outputs, so the team is invisible to batch invariance and the parity tests.

use rayon::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Spins of an idle helper before it starts yielding its core between checks (a few
/// hundred microseconds: longer than the gaps between a decode step's loops).
const SPINS: u32 = 1 << 15;

/// One pass's team: the leader publishes loops, helpers take indices.
struct Team {
    /// Generation of the newest published loop (0: none yet).
    generation: AtomicUsize,
    /// The newest generation whose loop is closed: no helper may start on it any more.
    closed: AtomicUsize,
    /// The published loop: the address of a `&(dyn Fn(usize) + Sync)` on the leader's
    /// stack, its length, and the next index to hand out.
    job: AtomicUsize,
    len: AtomicUsize,
    next: AtomicUsize,
    /// Helpers inside a loop now.
    active: AtomicUsize,
    /// Set when the pass is over: helpers return.
    stop: AtomicBool,
}

type Job<'a> = &'a (dyn Fn(usize) + Sync);

thread_local! {
    /// The team this thread leads, or null.
    static LEAD: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
    /// Whether this thread is running an item of a team's loop (loops inside run inline).
    static IN_LOOP: Cell<bool> = const { Cell::new(false) };
}

/// Runs `pass` on this thread with the pool's other threads kept on it: every
/// [`for_each`] inside is shared with them. Runs `pass` plainly outside a pool, on a pool
/// of one thread, or inside another team. Loops inside `pass` that do not go through
/// [`for_each`] still run (rayon's, on this thread alone), so only passes whose parallel
/// work is all [`for_each`] should use a team.
pub fn with_team<R: Send>(pass: impl FnOnce() -> R + Send) -> R {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    let nested = !LEAD.get().is_null() || IN_LOOP.get();
    if helpers == 0 || rayon::current_thread_index().is_none() || nested {
        return pass();
    }
    let team = Team {
        generation: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
        job: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        next: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    };
    lead(&team, helpers, pass)
}

/// Runs `pass` as the leader of `team` after starting `helpers` helpers: each through
/// `rayon::join`, whose other half waits on this thread's stack for a free thread to take
/// it (no allocation per pass). A half nobody took runs here after the pass, and returns
/// at once.
fn lead<R: Send>(team: &Team, helpers: usize, pass: impl FnOnce() -> R + Send) -> R {
    if helpers > 0 {
        return rayon::join(|| lead(team, helpers - 1, pass), || help(team)).0;
    }
    /// Ends the pass even when it panics: helpers return, this thread leads no more.
    struct End<'a>(&'a Team);
    impl Drop for End<'_> {
        fn drop(&mut self) {
            LEAD.set(std::ptr::null());
            self.0.stop.store(true, Ordering::Release);
        }
    }
    LEAD.set(team);
    let _end = End(team);
    pass()
}

/// A helper's life: take part in every loop published until the pass ends.
fn help(team: &Team) {
    if std::ptr::eq(LEAD.get(), team) {
        // The leader itself ran this job while waiting inside the pass: nothing to help.
        return;
    }
    /// Leaves the loop even when an item panics, so the leader does not wait forever.
    struct Leave<'a>(&'a Team);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            IN_LOOP.set(false);
            self.0.active.fetch_sub(1, Ordering::Release);
        }
    }
    let mut seen = 0;
    let mut idle = 0u32;
    loop {
        let g = team.generation.load(Ordering::Acquire);
        if g != seen {
            seen = g;
            idle = 0;
            // Enter, then check the loop is still open: the leader closes it before it
            // waits for `active` to drain, so either it waits for us or we see it closed.
            team.active.fetch_add(1, Ordering::SeqCst);
            let _leave = Leave(team);
            if team.closed.load(Ordering::SeqCst) < g {
                IN_LOOP.set(true);
                // SAFETY: loop `g` is open, so its leader is inside `for_each` and will not
                // return (nor publish another loop) before `active` drains: the `Job` it
                // points at is alive for as long as we use it.
                let f: Job<'_> = unsafe { *(team.job.load(Ordering::Acquire) as *const Job<'_>) };
                take(team, f);
            }
            continue;
        }
        if team.stop.load(Ordering::Acquire) {
            return;
        }
        idle = idle.saturating_add(1);
        if idle < SPINS {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Runs the published loop's indices until none are left.
fn take(team: &Team, f: Job<'_>) {
    let len = team.len.load(Ordering::Acquire);
    loop {
        let i = team.next.fetch_add(1, Ordering::Relaxed);
        if i >= len {
            return;
        }
        f(i);
    }
}

/// Whether this thread leads a team now, so that a parallel loop's hand-off costs about a
/// microsecond (rayon's is tens).
pub fn leading() -> bool {
    !LEAD.get().is_null() && !IN_LOOP.get()
}

/// Runs `f(i)` for every `i` in `0..n`, in parallel: with the team when this thread leads
/// one, inline inside a team's loop, else over rayon's pool. Items must not depend on
/// each other's order.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync + Send) {
    if n == 0 {
        return;
    }
    if IN_LOOP.get() || n == 1 {
        (0..n).for_each(f);
        return;
    }
    let lead = LEAD.get();
    if lead.is_null() {
        (0..n).into_par_iter().for_each(f);
        return;
    }
    // SAFETY: LEAD points at the team of the `with_team` running on this thread's stack
    // (it is reset before that team is dropped).
    let team = unsafe { &*lead };
    let job: Job<'_> = &f;
    team.job
        .store(&job as *const Job<'_> as usize, Ordering::Relaxed);
    team.len.store(n, Ordering::Relaxed);
    team.next.store(0, Ordering::Relaxed);
    let g = team.generation.load(Ordering::Relaxed) + 1;
    /// Closes the loop and waits for the helpers inside it to leave, even when an item
    /// panics here: they read `job`, which lives on this frame.
    struct Close<'a>(&'a Team, usize);
    impl Drop for Close<'_> {
        fn drop(&mut self) {
            IN_LOOP.set(false);
            self.0.closed.store(self.1, Ordering::SeqCst);
            while self.0.active.load(Ordering::SeqCst) != 0 {
                std::hint::spin_loop();
            }
        }
    }
    let _close = Close(team, g);
    team.generation.store(g, Ordering::Release);
    IN_LOOP.set(true);
    take(team, job);
}

/// Runs `f` over ranges that together cover `0..units` once, in parallel, each range a
/// share of what is left when it is taken: `1 / (2 · threads)` of it, at least one unit.
/// The first ranges are long (a long stream of weights for each thread) and the last ones
/// short, so threads finish a loop together however their speeds differ: a thread that
/// is late or slow takes fewer ranges, not a last long one that the others wait for.
pub fn for_each_range(units: usize, f: impl Fn(std::ops::Range<usize>) + Sync + Send) {
    let threads = rayon::current_num_threads().max(1);
    if units == 0 {
        return;
    }
    let next = AtomicUsize::new(0);
    let share = |_| loop {
        let start = next.load(Ordering::Relaxed);
        if start >= units {
            return;
        }
        let len = ((units - start) / (2 * threads)).max(1);
        if next
            .compare_exchange_weak(start, start + len, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            f(start..start + len);
        }
    };
    for_each(threads.min(units), share);
}

/// A slice cut into consecutive chunks of `size` (the last may be shorter) that parallel
/// items take one each.
struct Chunks<T> {
    ptr: *mut T,
    len: usize,
    size: usize,
}

// SAFETY: a `Chunks` hands each item its own chunk of a slice of `Send` values; it is only
// built from a `&mut [T]` that outlives the loop.
unsafe impl<T: Send> Sync for Chunks<T> {}
unsafe impl<T: Send> Send for Chunks<T> {}

impl<T: Send> Chunks<T> {
    fn new(data: &mut [T], size: usize) -> Self {
        assert!(size > 0, "chunks of size 0");
        Chunks {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            size,
        }
    }

    fn count(&self) -> usize {
        self.len.div_ceil(self.size)
    }

    /// Chunk `i`.
    ///
    /// # Safety
    /// No two live references to the same chunk: each index taken once.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, i: usize) -> &mut [T] {
        let start = i * self.size;
        let end = (start + self.size).min(self.len);
        assert!(start < end, "chunk {i} out of range");
        std::slice::from_raw_parts_mut(self.ptr.add(start), end - start)
    }
}

/// `f(i, a_i, b_i, c_i)` in parallel over the `i`-th chunks of three slices (chunks of
/// `sa`, `sb` and `sc` elements), as many items as `a` has chunks (`b` and `c` must have
/// as many).
pub fn for_each_chunk3<A: Send, B: Send, C: Send>(
    (a, sa): (&mut [A], usize),
    (b, sb): (&mut [B], usize),
    (c, sc): (&mut [C], usize),
    f: impl Fn(usize, &mut [A], &mut [B], &mut [C]) + Sync + Send,
) {
    let (a, b, c) = (Chunks::new(a, sa), Chunks::new(b, sb), Chunks::new(c, sc));
    let n = a.count();
    assert!(
        b.count() == n && c.count() == n,
        "for_each_chunk3: chunk counts differ"
    );
    // SAFETY: `for_each` runs each index once, so each chunk is borrowed by one item only.
    for_each(n, |i| unsafe { f(i, a.get(i), b.get(i), c.get(i)) });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `run` on a pool of 3 threads, outside a team and then inside one.
    fn outside_and_inside_a_team(run: impl Fn() + Send + Sync) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            run();
            with_team(&run);
        });
    }

    #[test]
    fn every_index_runs_once_inside_and_outside_a_team() {
        outside_and_inside_a_team(|| {
            for n in [0usize, 1, 2, 7, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each(n, |i| {
                    // A loop inside an item runs inline.
                    for_each(3, |_| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 3));
            }
        });
    }

    #[test]
    fn ranges_cover_every_unit_once_and_shrink() {
        outside_and_inside_a_team(|| {
            for units in [0usize, 1, 2, 5, 6, 7, 100, 4099] {
                let hits: Vec<AtomicUsize> = (0..units).map(|_| AtomicUsize::new(0)).collect();
                let ranges = std::sync::Mutex::new(Vec::new());
                for_each_range(units, |r| {
                    assert!(!r.is_empty() && r.end <= units, "range {r:?} of {units}");
                    r.clone().for_each(|u| {
                        hits[u].fetch_add(1, Ordering::Relaxed);
                    });
                    ranges.lock().unwrap().push(r);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                // Each range is a sixth (two per thread) of what was left.
                let mut ranges = ranges.into_inner().unwrap();
                ranges.sort_by_key(|r| r.start);
                for r in &ranges {
                    assert_eq!(r.len(), ((units - r.start) / 6).max(1), "{r:?}");
                }
            }
        });
    }

    #[test]
    fn a_panicking_item_ends_the_pass_without_hanging() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| {
                with_team(|| {
                    for_each(64, |i| {
                        if i == 40 {
                            panic!("item 40");
                        }
                    })
                })
            })
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        pool.install(|| with_team(|| for_each(10, |_| {})));
    }
}
