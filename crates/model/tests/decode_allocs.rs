//! A decode step allocates nothing: every buffer lives in the workspace, the cache or a
//! thread-local that grew during warm-up. Counted by a global allocator over all threads,
//! on the real 270M model with the packed kernels, at a context past a key part (1024) so
//! the parallel attention path runs too. The cache grows by pages of 256 positions: the
//! step that enters a new page allocates that page (a few allocations per layer), and no
//! other step does.

mod common;
use common::*;
use gemma3_formats::GgufFile;
use gemma3_model::{KvCache, Logits, TextModel, Workspace};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_steps_allocate_nothing() {
    let g = GgufFile::open(real_model_path()).unwrap();
    let model = TextModel::from_gguf(&g).unwrap();
    let decode = || {
        let mut ws = Workspace::new(&model.cfg, 512);
        let mut cache = KvCache::new(&model.cfg, 2048, 512);
        let ids: Vec<u32> = (0..1100u32).map(|i| 2 + (i * 7919) % 20000).collect();
        for chunk in ids.chunks(512) {
            model
                .forward(chunk, &mut cache, &mut ws, Logits::Last, &mut |_, _| {})
                .unwrap();
        }
        let mut next = 0u32;
        let mut step = |next: &mut u32| {
            model
                .forward(&[*next], &mut cache, &mut ws, Logits::Last, &mut |_, l| {
                    *next = l
                        .iter()
                        .enumerate()
                        .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                        .0 as u32;
                })
                .unwrap();
        };
        // Warm-up: thread-local buffers reach their decode sizes on every thread.
        for _ in 0..8 {
            step(&mut next);
        }
        // Positions 1108 .. 1124: inside one page.
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..16 {
            step(&mut next);
        }
        let within = ALLOCATIONS.load(Ordering::Relaxed) - before;
        // On to position 1280, where the full layers need a new page.
        for _ in 1124..1279 {
            step(&mut next);
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        step(&mut next);
        step(&mut next);
        let crossing = ALLOCATIONS.load(Ordering::Relaxed) - before;
        let layers = model.cfg.num_layers;
        assert!(
            crossing > 0 && crossing <= 4 * layers,
            "entering a page made {crossing} allocations"
        );
        within
    };
    // Called on a pool thread (as `bench` does) and from outside the pool (as `generate`
    // does, each pass hopping onto a worker).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let inside = pool.install(decode);
    assert_eq!(
        inside, 0,
        "16 decode steps in the pool made {inside} allocations"
    );
    let outside = decode();
    assert_eq!(
        outside, 0,
        "16 decode steps from outside the pool made {outside} allocations"
    );
}
