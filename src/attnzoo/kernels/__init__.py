"""Custom autograd kernels, each exact against :func:`attnzoo.functional.attend`'s float64 math path.

- :mod:`~attnzoo.kernels.biased`: tiny maps with a learnable additive bias (Swin windows, temporal);
- :mod:`~attnzoo.kernels.blocked`: global attention whose query and value widths differ (SAGAN);
- :mod:`~attnzoo.kernels.flash`: SDPA's CPU flash kernel with a double backward (behind ``attend``);
- :mod:`~attnzoo.kernels.gate`: the channel/spatial gates of SE, CBAM and the dual gate;
- :mod:`~attnzoo.kernels.neighbourhood`: ACmix's local neighbourhood attention;
- :mod:`~attnzoo.kernels.neighbourhood_nd`: NATTEN's 1-/2-/3-D window rules and gathered attention
  (composite ops, no custom Function);
- :mod:`~attnzoo.kernels.selective`: SK's branch selection;
- :mod:`~attnzoo.kernels.choose`: which of two equally exact fast paths runs (calibrated once per
  shape class and cached, or overridden per site);
- :mod:`~attnzoo.kernels.route`: where the kernels give way to plain ops (functorch transforms,
  ``torch.compile``, dispatch modes) and how their backward recomputes for ``create_graph=True``.
"""
