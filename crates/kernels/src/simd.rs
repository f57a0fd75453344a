//! Run-time choice of instruction set. Kernels are written once as `#[inline(always)]`
//! generic Rust that LLVM vectorises, then instantiated inside `#[target_feature]`
//! wrappers; [`level`] picks the best one this CPU runs. `GEMMA3_SIMD=scalar|avx2|avx512`
//! forces a lower level (tests use it to cover the portable path).

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Portable code: whatever the compile target guarantees (SSE2 on x86-64, NEON on aarch64).
    Portable = 1,
    /// AVX2 + FMA + F16C.
    Avx2 = 2,
    /// AVX-512 F/BW/VL (+ VNNI where present).
    Avx512 = 3,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// The instruction set the kernels use: the best detected, capped by `GEMMA3_SIMD`.
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Portable,
        2 => Level::Avx2,
        3 => Level::Avx512,
        _ => {
            let best = detect();
            let cap = match std::env::var("GEMMA3_SIMD").as_deref() {
                Ok("scalar") | Ok("portable") => Level::Portable,
                Ok("avx2") => Level::Avx2,
                _ => Level::Avx512,
            };
            let l = best.min(cap);
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

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
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

/// Turns the VNNI instructions off (or back on where the CPU has them), as
/// `GEMMA3_NO_VNNI` does; for tests and benchmarks. Returns whether any is in use.
pub fn set_vnni(on: bool) -> bool {
    VNNI.store(if on { 2 } else { 1 }, Ordering::Relaxed);
    has_vnni() || has_avx_vnni()
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

/// Forces a level (clamped to what the CPU supports); for tests and benchmarks.
pub fn set_level(l: Level) -> Level {
    let l = l.min(detect());
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
                    $crate::simd::Level::Portable => {}
                }
            }
            $body::<false>($($arg),*)
        }
    };
}
