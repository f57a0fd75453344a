use gemma3_kernels::qdot::{ActBlock, QuantActs};
fn main() {
    for cols in [2048usize, 2560, 10240] {
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.01)
            .collect();
        let mut a = QuantActs::default();
        a.quantize_as(&x, 1, cols, ActBlock::Q8K);
        let t = std::time::Instant::now();
        let n = 20000;
        for _ in 0..n {
            a.quantize_as(std::hint::black_box(&x), 1, cols, ActBlock::Q8K);
        }
        println!(
            "cols {cols}: {:.2} us",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}
