"""The pieces of ``bench/overhead.py``, one job per module.

* ``workload``: the train states and jitted steps being checkpointed (random values).
* ``measure``: clocks, memory sampling, page-cache eviction, plain disk bandwidth, machine.
* ``savers``: jaxckpt and raw Orbax behind one small interface (public APIs only).
* ``phases``: one measurement each (interleaved periods, blocking, idle writes, reads...).
* ``figures``: pure arithmetic from measurements to ratios and raw figures.
* ``cases``: what one fresh subprocess runs (a state size, many leaves, auto, tuning).
* ``runner``: the parent: one subprocess per case, progress, the result document.
* ``report``: targets, summary and the tables (terminal and Markdown).
"""
