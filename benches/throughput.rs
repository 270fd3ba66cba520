//! Benchmark harness (issue 4): see BENCHMARKS.md. Work in progress.
fn main() {
    println!("benchmark harness not written yet");
}
