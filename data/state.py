"""Main-process view of one rank's data stream, built from the batches the training step
actually consumed: where each worker's stream is (to resume exactly) and how many samples each
worker skipped, by reason (to log).

Feed it in the training step, not in the loader: Lightning fetches one batch ahead, so a state
taken from the loader side would be one batch past what was trained on."""

from collections import Counter

STATE_VERSION = 1


class StreamState:
    def __init__(self):
        self.layout: dict | None = None  # seed, rank, world_size, num_workers of the stream
        self.workers: dict[int, dict] = {}  # worker -> {'taken', 'waiting', 'skips'}
        self.next_worker = 0

    def update(self, batch: dict) -> None:
        """Record the position and skip counts stamped on a consumed batch."""
        report = batch["stream"]
        layout = {key: report[key] for key in ("seed", "rank", "world_size", "num_workers")}
        if self.layout is not None and layout != self.layout:
            raise ValueError(f"StreamState got a batch from stream {layout} after batches from {self.layout}; "
                             f"use one StreamState per loader")
        self.layout = layout
        worker = report["worker"]
        self.workers[worker] = {"taken": report["taken"], "waiting": list(report["waiting"]), "skips": dict(report["skips"])}
        # The DataLoader takes batches from its workers in turn.
        self.next_worker = (worker + 1) % layout["num_workers"]

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far on this rank, by reason, summed over workers (cumulative over
        resumes). Sum over ranks with an all-reduce if a global count is wanted."""
        total = Counter()
        for position in self.workers.values():
            total.update(position["skips"])
        return dict(sorted(total.items()))

    def samples_read(self) -> int:
        """Raw samples taken from the shards so far on this rank (decoded or skipped)."""
        return sum(position["taken"] for position in self.workers.values())

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "layout": self.layout, "next_worker": self.next_worker,
                "workers": {worker: dict(position) for worker, position in self.workers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data stream state version {state.get('version')!r} is not {STATE_VERSION}; "
                             f"it was written by another version of data/state.py")
        self.layout = state["layout"]
        self.next_worker = int(state["next_worker"])
        self.workers = {int(worker): dict(position) for worker, position in state["workers"].items()}


def check_resumable(state: dict, layout: dict) -> None:
    """A saved position only means something for the same seed, rank, world size and worker count."""
    saved = state.get("layout")
    if saved is None:  # saved before the first batch: nothing to resume
        return
    for key, value in layout.items():
        if saved[key] != value:
            raise ValueError(
                f"cannot resume the data stream: it was saved with {key}={saved[key]} but now {key}={value}. "
                f"Resume with the same value, or start a fresh stream (leave out the saved data state).")
