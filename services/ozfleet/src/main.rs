// mimalloc rather than glibc's malloc: at 10,000 nodes the gateway spends ~10–20 % less CPU
// per task and keeps claim p99 under 5 ms at rates where glibc's does not, and it hands
// pages freed after a busy spell back by itself (BENCHMARKS.md, round 4). `no_thp`: without
// it, mimalloc asks for transparent huge pages and an idle gateway's RSS grows by ~12 MB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ozfleet::main()
}
