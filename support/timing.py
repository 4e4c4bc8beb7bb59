"""Timing and comparison. Every time printed is measured after the GPU work it names has finished: CUDA
events (or a synchronize) on GPU, with warm-up apart; plain clocks on CPU."""
import os
import statistics
import time

import torch


def time_ms(fn, device, warmup=3, repeats=20):
    """Median wall time of fn() in ms: CUDA events on GPU (after warm-up), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        clock = Clock(device)
        fn()
        times.append(clock.mark() * 1e3)
    return statistics.median(times)


class Clock:
    """Seconds from its start to marks on the device's timeline. On GPU the start waits for the GPU to be
    idle and each mark is a CUDA event recorded on the current stream, so a mark's time is when the GPU
    finished the work enqueued before it, not when the host enqueued it; reading it costs no wait until
    `seconds()` (or `mark()`, which waits for its own event). On CPU, perf_counter."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.events = []
        if self.cuda:
            torch.cuda.synchronize()
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()
        self.host_start = time.perf_counter()

    def record(self):
        """Mark now (on the current stream) without waiting; returns the mark's index."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        else:
            self.events.append(time.perf_counter())
        return len(self.events) - 1

    def seconds(self):
        """Every mark so far, in seconds from the start (waits for the GPU to reach the last one)."""
        if self.cuda:
            for event in self.events:
                event.synchronize()
            return [self.start.elapsed_time(e) / 1e3 for e in self.events]
        return [t - self.start for t in self.events]

    def mark(self):
        """Record a mark, wait for it, and return its seconds from the start."""
        self.record()
        return self.seconds()[-1]

    def host_seconds(self):
        """Seconds from the start on the host's clock: the true time of work the host has already waited
        for (frames copied to the host, say), whichever stream made it."""
        return time.perf_counter() - self.host_start


class Timings:
    """A benchmark table: named times in ms, each printed as it is measured (where `show`, i.e. on rank 0),
    with its speed-up over an earlier row when asked."""

    def __init__(self, device, show=True, warmup=3, repeats=20):
        self.device, self.show, self.warmup, self.repeats = device, show, warmup, repeats
        self.ms = {}

    def add(self, name, ms, note="", versus=None):
        """Record (and print) a time measured elsewhere."""
        self.ms[name] = ms
        if versus is not None:
            note = f"{note}   {self.ms[versus] / ms:5.1f}x vs {versus}".strip()
        if self.show:
            print(f"  {name:<44s} {ms:10.3f} ms   {note}".rstrip(), flush=True)
        return ms

    def time(self, name, fn, note="", versus=None):
        """Median time of fn() (time_ms), recorded and printed."""
        return self.add(name, time_ms(fn, self.device, self.warmup, self.repeats), note, versus)


def host_and_kernel_ms(fn, repeats=10):
    """Per call of fn on this rank: the host time to enqueue it and the wall time until the GPU is done
    (both without the profiler, whose tracing slows the host), and, from torch.profiler, the summed time of
    the GPU kernels it ran (kernels of different streams, e.g. NCCL's, are summed even where they overlap).
    Returns (host, wall, kernels, profiler table)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
    table = events.table(sort_by="self_cuda_time_total", row_limit=25)
    return host * 1e3 / repeats, wall * 1e3 / repeats, kernels / repeats, table


def relative_rms(got, want):
    """||got - want|| / ||want|| over all elements, in float64."""
    return ((got.double() - want.double()).pow(2).mean().sqrt() / want.double().pow(2).mean().sqrt()).item()


def host_rss_gib():
    """This process's resident host memory now, in GiB (Linux's /proc; 0.0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return 0.0


class MinuteReport:
    """A long stream's health, one line per minute of video (60 s of frames at `fps`) as it is made: that
    minute's frames per second, the peak GPU memory during it and the host's resident memory at its end.
    Flat memory shows as equal lines. `add(frames, seconds)`: `frames` more frames reached the viewer
    `seconds` after the start."""

    def __init__(self, fps, device, show=True):
        self.fps, self.cuda, self.show = fps, torch.device(device).type == "cuda", show
        self.frames, self.minute_start, self.rows = 0, 0.0, []

    def add(self, frames, seconds):
        self.frames += frames
        while self.frames >= (len(self.rows) + 1) * 60 * self.fps:
            spent = seconds - self.minute_start
            gpu = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else 0.0
            self.rows.append((60 * self.fps / spent, gpu, host_rss_gib()))
            if self.show:
                fps, gpu, host = self.rows[-1]
                gpu_text = f"peak GPU memory {gpu:.2f} GiB, " if self.cuda else ""
                print(f"  minute {len(self.rows)} of video ({60 * self.fps} frames): {fps:.1f} FPS, "
                      f"{gpu_text}host RSS {host:.2f} GiB", flush=True)
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            self.minute_start = seconds
