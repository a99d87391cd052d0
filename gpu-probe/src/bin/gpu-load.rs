//! `gpu-load`: fills most of one GPU's memory and keeps the GPU busy for a while, so the
//! real-GPU check can show gpu-probe's readings and verdict move. Uses only the CUDA
//! driver API (allocations, memset and device-to-device copies): no compiler or toolkit
//! is needed on the node.

#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use cudarc::driver::{CudaContext, CudaSlice};

/// Fill a GPU's memory and keep it busy.
#[derive(Parser, Debug)]
#[command(name = "gpu-load")]
struct Args {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Share of total memory to leave in use when done allocating, percent.
    #[arg(long, default_value_t = 97.0)]
    fill_pct: f64,
    /// How long to keep the GPU busy, seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

fn run(args: &Args) -> Result<(), String> {
    if !gpu_probe::source::nvidia::libcuda_present() {
        return Err("no NVIDIA driver: libcuda could not be loaded".into());
    }
    let err = |what: &str| {
        let what = what.to_string();
        move |e: cudarc::driver::DriverError| format!("{what}: {e}")
    };
    let ctx = CudaContext::new(args.device).map_err(err("cuCtxCreate"))?;
    let stream = ctx.default_stream();
    let (free, total) = ctx.mem_get_info().map_err(err("cuMemGetInfo"))?;
    let target_free = (total as f64 * (1.0 - args.fill_pct / 100.0)) as usize;
    println!(
        "device {}: {:.1} GiB free of {:.1} GiB; filling to {:.1} GiB free",
        args.device,
        free as f64 / (1u64 << 30) as f64,
        total as f64 / (1u64 << 30) as f64,
        target_free as f64 / (1u64 << 30) as f64
    );
    let chunk = 1usize << 30;
    let mut blocks: Vec<CudaSlice<u8>> = Vec::new();
    loop {
        let (free, _) = ctx.mem_get_info().map_err(err("cuMemGetInfo"))?;
        if free <= target_free + (256 << 20) {
            break;
        }
        let size = chunk.min(free - target_free);
        match stream.alloc_zeros::<u8>(size) {
            Ok(b) => blocks.push(b),
            Err(e) => {
                println!("allocation stopped: {e}");
                break;
            }
        }
    }
    let (free, _) = ctx.mem_get_info().map_err(err("cuMemGetInfo"))?;
    println!(
        "holding {} blocks; {:.1} GiB free",
        blocks.len(),
        free as f64 / (1u64 << 30) as f64
    );
    if blocks.len() < 2 {
        return Err("could not allocate two blocks to copy between".into());
    }
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut copied = 0u64;
    let mut last_report = Instant::now();
    let started = Instant::now();
    while Instant::now() < deadline {
        let (a, b) = blocks.split_at_mut(1);
        stream
            .memcpy_dtod(&a[0], &mut b[0])
            .map_err(err("cuMemcpyDtoD"))?;
        stream.memset_zeros(&mut a[0]).map_err(err("cuMemsetD8"))?;
        stream.synchronize().map_err(err("cuStreamSynchronize"))?;
        copied += chunk as u64;
        if last_report.elapsed() >= Duration::from_secs(2) {
            println!(
                "busy {:>4.1} s: {:.0} GiB/s device-to-device",
                started.elapsed().as_secs_f64(),
                copied as f64 / started.elapsed().as_secs_f64() / (1u64 << 30) as f64
            );
            last_report = Instant::now();
        }
    }
    drop(blocks);
    println!("released");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu-load: {e}");
            ExitCode::from(2)
        }
    }
}
