//! Run-time choice of instruction set. Kernels are written once as `#[inline(always)]`
//! generic Rust that LLVM vectorises, then instantiated inside `#[target_feature]`
//! wrappers; [`level`] picks the best one this CPU runs. `GEMMA3_SIMD=portable|avx2|avx512`
//! on x86-64, `portable|neon` on aarch64, forces a lower level (tests use it to cover the
//! portable path); `scalar` is another name for `portable`.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Portable code: whatever the compile target guarantees (SSE2 on x86-64, NEON on
    /// aarch64), multiplies and adds unfused.
    Portable = 1,
    /// x86-64: AVX2 + FMA + F16C.
    Avx2 = 2,
    /// x86-64: AVX-512 F/BW/VL (+ VNNI where present).
    Avx512 = 3,
    /// aarch64: NEON with fused multiply-adds and explicit kernels (+ the dot-product
    /// instructions `sdot` where present).
    Neon = 4,
}

impl Level {
    /// The name `GEMMA3_SIMD` takes for this level.
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Neon => "neon",
        }
    }

    fn from_u8(v: u8) -> Option<Level> {
        Some(match v {
            1 => Level::Portable,
            2 => Level::Avx2,
            3 => Level::Avx512,
            4 => Level::Neon,
            _ => return None,
        })
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

/// Whether this CPU runs level `l`'s code.
fn supported(l: Level) -> bool {
    match l {
        Level::Portable => true,
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            supported(Level::Avx2)
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
        }
        // NEON (Advanced SIMD) is part of every aarch64 CPU Rust targets.
        #[cfg(target_arch = "aarch64")]
        Level::Neon => std::arch::is_aarch64_feature_detected!("neon"),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Every level this CPU runs, lowest first (tests walk them).
pub fn levels() -> Vec<Level> {
    [Level::Portable, Level::Avx2, Level::Avx512, Level::Neon]
        .into_iter()
        .filter(|&l| supported(l))
        .collect()
}

/// The best level this CPU runs.
fn detect() -> Level {
    *levels().last().unwrap_or(&Level::Portable)
}

/// `l` if this CPU runs it, else the best level below it on the same architecture
/// (AVX-512 falls to AVX2), else the portable code.
fn clamp(l: Level) -> Level {
    if supported(l) {
        l
    } else if l == Level::Avx512 && supported(Level::Avx2) {
        Level::Avx2
    } else {
        Level::Portable
    }
}

/// The instruction set the kernels use: the best detected, capped by `GEMMA3_SIMD`.
pub fn level() -> Level {
    match Level::from_u8(LEVEL.load(Ordering::Relaxed)) {
        Some(l) => l,
        None => {
            let best = detect();
            let l = match std::env::var("GEMMA3_SIMD").as_deref() {
                Ok("scalar") | Ok("portable") => Level::Portable,
                Ok("avx2") => clamp(Level::Avx2),
                Ok("neon") => clamp(Level::Neon),
                _ => best,
            };
            // Only if no one set a level meanwhile (set_level wins over detection).
            match LEVEL.compare_exchange(0, l as u8, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => l,
                Err(_) => level(),
            }
        }
    }
}

/// 8-bit dot-product instructions in use: 0 = not decided yet, 1 = off, 2 = on.
static VNNI: AtomicU8 = AtomicU8::new(0);

#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
fn vnni_enabled() -> bool {
    match VNNI.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("GEMMA3_NO_VNNI").is_err();
            let v = if on { 2 } else { 1 };
            match VNNI.compare_exchange(0, v, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => on,
                Err(_) => vnni_enabled(),
            }
        }
    }
}

/// Turns the 8-bit dot-product instructions (VNNI on x86-64, `sdot` on aarch64) off, or
/// back on where the CPU has them, as `GEMMA3_NO_VNNI` does; for tests and benchmarks.
/// Returns whether any is in use.
pub fn set_vnni(on: bool) -> bool {
    VNNI.store(if on { 2 } else { 1 }, Ordering::Relaxed);
    has_vnni() || has_avx_vnni() || has_dotprod()
}

/// Whether the CPU has the Arm dot-product instructions (`sdot`, Armv8.4, optional from
/// 8.2), used by the packed kernels at the NEON level.
pub fn has_dotprod() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("dotprod") && vnni_enabled()
    }
    #[cfg(not(target_arch = "aarch64"))]
    false
}

/// Whether the CPU has AVX-512 VNNI (8-bit dot products on 512-bit vectors), used by the
/// quantized kernels at the AVX-512 level.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni") && vnni_enabled()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AVX-VNNI (the same dot products on 256-bit vectors), used by the
/// packed kernels at the AVX2 level.
pub fn has_avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avxvnni") && vnni_enabled()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Forces a level (the best below it where the CPU lacks it); for tests and benchmarks.
/// Returns the level now in use.
pub fn set_level(l: Level) -> Level {
    let l = clamp(l);
    LEVEL.store(l as u8, Ordering::Relaxed);
    l
}

/// Defines `$name(args) -> ret` that calls `$body_fn(args)` compiled for the best level.
/// `$body_fn` must be `#[inline(always)]` so it is re-compiled inside each wrapper; its
/// `const FMA: bool` parameter says whether fused multiply-add is cheap (it is a libm call
/// on the portable path, so there the body must multiply and add separately).
#[macro_export]
macro_rules! dispatch {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? => $body:ident) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { $body::<true>($($arg),*) }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { $body::<true>($($arg),*) }
                match $crate::simd::level() {
                    // SAFETY: level() only reports features the CPU has.
                    $crate::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            // NEON is always there on aarch64; the level adds fused multiply-adds.
            #[cfg(target_arch = "aarch64")]
            if $crate::simd::level() == $crate::simd::Level::Neon {
                return $body::<true>($($arg),*);
            }
            $body::<false>($($arg),*)
        }
    };
}

/// Asks for the cache line holding `at` in a state ready for writing, without waiting
/// (`prefetchw` where the CPU has it; a plain prefetch on the others). Nothing on targets
/// whose prefetch intrinsics are not stable Rust.
#[inline(always)]
pub fn prefetch_write(at: &u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing architecturally and never faults.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
        _mm_prefetch::<_MM_HINT_ET0>(std::ptr::from_ref(at).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}
