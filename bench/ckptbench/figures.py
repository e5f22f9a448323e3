"""From measurements to figures: pure arithmetic, no I/O, no JAX.

Every ratio is measured in the same process and the same interleaved rounds: a quotient
of two medians, the median of per-round quotients (``throughput_over_orbax``), or, for
``throughput_ratio``, steps/s over all periods of each kind. ``size_figures`` documents
each one where it is computed.
"""

from __future__ import annotations

from ckptbench.measure import median as med
from ckptbench.measure import median_interval, pct, spread

KINDS = ("jaxckpt", "orbax")


def steps_per_s(blocks: list[dict], every: int) -> float:
    """Steps per second over periods of ``every`` steps each."""
    return every * len(blocks) / sum(b["s"] for b in blocks)


def per_round_speedup(blocks: dict[str, list[dict]], kind: str, over: str) -> list[float]:
    """Steps/s of ``kind``'s period ÷ ``over``'s, round by round: the two periods of a
    round run back to back (same steps, order rotated), so load from other processes
    hits both alike."""
    return [o["s"] / k["s"] for k, o in zip(blocks[kind], blocks[over])]


def lost_per_save(blocks: dict[str, list[dict]], kind: str) -> float:
    """Training time one save costs: median period with a save minus median without."""
    return med(b["s"] for b in blocks[kind]) - med(b["s"] for b in blocks["none"])


def per_round_lost(blocks: dict[str, list[dict]], kind: str, over: str) -> list[float]:
    """Seconds ``kind``'s period took more than ``over``'s, round by round (the two ran
    back to back). Their median compares two kinds' loss per save without the drift
    between rounds, which a difference of two medians keeps: at 32 MiB the periods of
    one kind spread over +-0.4 s across a run, a hundred host copies of the state."""
    return [k["s"] - o["s"] for k, o in zip(blocks[kind], blocks[over])]


def size_figures(m: dict) -> tuple[dict, dict]:
    """``(ratios, raw)`` for one state size from the phases' measurements ``m``.

    ``m`` holds: state_bytes, every, step_s, on_cpu, rounds, model, platform, first
    (``phases.first_save``), blocks (``interleaved_periods``), extra_blocking
    (``blocking_saves``), sync, d2h (``device_to_host`` without ``host``), writes
    (``idle_writes``), reads (``cold_reads``), bytes_on_disk, orbax (its setup).
    """
    n, every, blocks = m["state_bytes"], m["every"], m["blocks"]
    sps = {k: steps_per_s(blocks[k], every) for k in ("none", *KINDS)}
    blocking = {k: [b["blocked"] for b in blocks[k]] + m["extra_blocking"][k] for k in KINDS}
    # Each jaxckpt save beside the Orbax save made next to it: jaxckpt's own share of
    # the blocking, as far as Orbax's run-to-run variance lets one see it.
    paired = [j - o for j, o in zip(blocking["jaxckpt"], blocking["orbax"])]
    d2h = m["d2h"]
    floor = med(d2h["copy"] if m["on_cpu"] else d2h["device_get"])
    writes, reads = m["writes"], m["reads"]
    persist_Bps = {k: n / med(writes["wall_s"][k]) for k in KINDS}
    restore_s = {k: med(reads["restore_s"][k]) for k in KINDS}
    idle_cpu = {k: med(writes["cpu_s"][k]) for k in KINDS}
    lost = {k: lost_per_save(blocks, k) for k in KINDS}
    disk_write, disk_read = med(writes["disk_write_Bps"]), med(reads["disk_read_Bps"])
    transient = {k: [b["peak_rss"] - b["rss_before"] for b in blocks[k]] for k in KINDS}
    transient_private = {k: [b["peak_private"] - b["private_before"] for b in blocks[k]]
                         for k in KINDS}
    period_cpu = {k: med(b["cpu_s"] for b in v) for k, v in blocks.items()}
    vs_orbax = per_round_speedup(blocks, "jaxckpt", "orbax")

    ratios = {
        # against the hardware and the loop without checkpoints
        "throughput_ratio": sps["jaxckpt"] / sps["none"],
        "blocking_over_d2h": med(blocking["jaxckpt"]) / floor,
        "policy_over_orbax": med(blocking["jaxckpt"]) / med(blocking["orbax"]),
        "persist_over_disk": persist_Bps["jaxckpt"] / disk_write,
        "restore_over_disk": (n / restore_s["jaxckpt"]) / disk_read,
        # private memory: RSS less the tensorstore code a first save pages in (see
        # measure.RssSampler); the RSS figure is in raw
        "peak_ram_over_state": m["first"]["peak_extra_private"] / n,
        # against raw Orbax in the same rounds (issue 16's targets)
        # The median of the rounds (issue 16's figure): one period disturbed by another
        # tenant moved the pooled quotient below by more than the target's margin.
        "throughput_over_orbax": med(vs_orbax),
        "save_cpu_over_orbax": idle_cpu["jaxckpt"] / idle_cpu["orbax"],
        "persist_over_orbax": persist_Bps["jaxckpt"] / persist_Bps["orbax"],
        "restore_over_orbax": restore_s["jaxckpt"] / restore_s["orbax"],
    }
    raw = {
        "platform": m["platform"],
        "state_bytes": n,
        "model": m["model"],
        "step_s": m["step_s"],
        "save_every_steps": every,
        "save_interval_s": every * m["step_s"],
        "rounds": m["rounds"],
        "steps_per_s": {"no_checkpoint": sps["none"], "jaxckpt_async": sps["jaxckpt"],
                        "orbax_async": sps["orbax"]},
        "orbax_throughput_ratio": sps["orbax"] / sps["none"],
        "throughput_over_orbax_per_round": vs_orbax,
        # Where the median of the rounds can be, from the rounds alone: an interval that
        # holds 1.0 means this run cannot tell jaxckpt's throughput from Orbax's.
        "throughput_over_orbax_interval": median_interval(vs_orbax),
        # steps/s over all jaxckpt periods ÷ over all Orbax periods (the figure of
        # ``throughput_over_orbax`` until 2026-12-02)
        "throughput_over_orbax_pooled": sps["jaxckpt"] / sps["orbax"],
        "throughput_ratio_per_round": [a["s"] / b["s"] for a, b in
                                       zip(blocks["none"], blocks["jaxckpt"])],
        "save_cost_training_s": lost["jaxckpt"],
        "orbax_save_cost_training_s": lost["orbax"],
        # None when noise made the periods with a save no slower than those without.
        "interval_for_0.97_s": lost["jaxckpt"] / 0.03 if lost["jaxckpt"] > 0 else None,
        "lost_per_save_over_host_copy": {k: lost[k] / floor for k in KINDS},
        # the same, from the rounds: median of (period with a save - the round's period
        # without one), and jaxckpt's period minus Orbax's (issue 16's comparison)
        "lost_per_save_paired_over_host_copy": {
            k: med(per_round_lost(blocks, k, "none")) / floor for k in KINDS},
        "lost_per_save_minus_orbax_over_host_copy":
            med(per_round_lost(blocks, "jaxckpt", "orbax")) / floor,
        "period_s": {k: [b["s"] for b in v] for k, v in blocks.items()},
        "period_cpu_s": {k: [b["cpu_s"] for b in v] for k, v in blocks.items()},
        "save_cpu_s": period_cpu["jaxckpt"] - period_cpu["none"],
        "orbax_save_cpu_s": period_cpu["orbax"] - period_cpu["none"],
        "idle_save_cpu_s": {k: spread(writes["cpu_s"][k]) for k in KINDS},
        "first_step_after_save_s": {k: med(b["first_step"] for b in v)
                                    for k, v in blocks.items()},
        "save_blocking_s": {k: spread(v) for k, v in blocking.items()},
        "save_blocking_p50_minus_orbax_s": med(blocking["jaxckpt"]) - med(blocking["orbax"]),
        "jaxckpt_own_s": {"p50": med(paired), "p95": pct(paired, 0.95), "all": paired,
                          "note": "each jaxckpt save() minus the raw Orbax save() made next "
                                  "to it (same state): jaxckpt's own share of the blocking"},
        "sync_save_blocking_s": spread(m["sync"]),
        "d2h_s": {"floor": floor,
                  "floor_is": "np.array(x, copy=True)" if m["on_cpu"] else "jax.device_get",
                  "numpy_copy_p50": med(d2h["copy"]), "numpy_copy_all": d2h["copy"],
                  "device_get_p50": med(d2h["device_get"]), "device_get_all": d2h["device_get"],
                  "device_get_note": ("zero-copy view of the CPU buffer: no floor"
                                      if m["on_cpu"] else "real device-to-host copy")},
        "persist_s": writes["wall_s"],
        "persist_Bps": persist_Bps["jaxckpt"],
        "orbax_persist_Bps": persist_Bps["orbax"],
        "bytes_on_disk": m["bytes_on_disk"],
        "disk": {"write_Bps": disk_write, "read_Bps": disk_read,
                 "write_Bps_all": writes["disk_write_Bps"],
                 "read_Bps_all": reads["disk_read_Bps"], "bytes": n,
                 "method": m["disk_method"]},
        "restore_cold_s": reads["restore_s"]["jaxckpt"],
        "restore_warm_s": reads["warm_s"],
        "restore_Bps": n / restore_s["jaxckpt"],
        "restore_exact": reads["exact"],
        "verify_cold_s": reads["verify_cold_s"],
        "verify_cold_bytes": reads["verify_cold_bytes"],
        "orbax_restore_cold_s": reads["restore_s"]["orbax"],
        "orbax_restore_Bps": n / restore_s["orbax"],
        "rss_train_bytes": m["first"]["rss_train"],
        "first_save_peak_extra_rss_bytes": m["first"]["peak_extra_rss"],
        "first_save_peak_extra_private_bytes": m["first"]["peak_extra_private"],
        "first_save_peak_rss_over_state": m["first"]["peak_extra_rss"] / n,
        "first_save_peak_over_rest_bytes": m["first"]["peak_over_rest"],
        "loop_peak_over_rest_bytes": m["first"]["loop_peak_over_rest"],
        "first_save_period_s": m["first"]["period"]["s"],
        "per_save_transient_rss_bytes": transient,
        "per_save_transient_private_bytes": transient_private,
        "orbax_per_save_transient_over_state": max(transient["orbax"]) / n,
        "jaxckpt_per_save_transient_over_state": max(transient["jaxckpt"]) / n,
        "state_handler": m["orbax"],
    }
    return ratios, raw


def leaves_figures(m: dict) -> tuple[dict, dict]:
    """``(ratios, raw)`` of the many-small-arrays case: per-leaf cost of save and restore.

    ``m`` holds: n_leaves, state_bytes, model, blocked_s, save_s, restore_s (each
    ``{kind: [seconds per round]}``) and bytes_on_disk.
    """
    leaves = m["n_leaves"]
    per_leaf = {what: {k: med(m[what][k]) / leaves for k in KINDS}
                for what in ("blocked_s", "save_s", "restore_s")}
    ratios = {
        "save_per_leaf_over_orbax": per_leaf["save_s"]["jaxckpt"] / per_leaf["save_s"]["orbax"],
        "restore_per_leaf_over_orbax": (per_leaf["restore_s"]["jaxckpt"]
                                        / per_leaf["restore_s"]["orbax"]),
        "blocking_over_orbax": (per_leaf["blocked_s"]["jaxckpt"]
                                / per_leaf["blocked_s"]["orbax"]),
    }
    raw = {"n_leaves": leaves, "state_bytes": m["state_bytes"], "model": m["model"],
           "per_leaf_s": per_leaf,
           **{what: {k: spread(m[what][k]) for k in KINDS}
              for what in ("blocked_s", "save_s", "restore_s")},
           "bytes_on_disk": m["bytes_on_disk"],
           "note": "save: save() then wait(), no training meanwhile; restore: cold "
                   "(pages evicted); per leaf = median seconds / leaves"}
    return ratios, raw
