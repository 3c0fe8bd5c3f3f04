"""Custom autograd kernels, each exact against `attnzoo.functional.attend`'s float64 math path.

- `attnzoo.kernels.biased`: tiny maps with a learnable additive bias (Swin windows, temporal);
- `attnzoo.kernels.blocked`: global attention whose query and value widths differ (SAGAN);
- `attnzoo.kernels.dropout`: dropout on attention weights and the product with the values, without
  keeping the dropped map (``attend``'s math path in training);
- `attnzoo.kernels.flash`: SDPA's CPU flash kernel with a double backward (behind ``attend``);
- `attnzoo.kernels.gate`: the channel/spatial gates of SE, CBAM and the dual gate;
- `attnzoo.kernels.mix`: a sum of branches weighted per sample and channel (ViP's reweighting), its
  weight gradients reduced a few samples at a time;
- `attnzoo.kernels.neighbourhood`: ACmix's local neighbourhood attention;
- `attnzoo.kernels.neighbourhood_nd`: NATTEN's 1-/2-/3-D window rules and gathered attention
  (a block of queries at a time, re-gathered in backward);
- `attnzoo.kernels.reduce`: a mean whose backward broadcasts instead of writing a full-size quotient
  (the pooled statistics of the gates);
- `attnzoo.kernels.relayout`: a linear layer on a re-laid-out copy of its input that keeps the input,
  not the copy, for backward (ViP's width branch);
- `attnzoo.kernels.selective`: SK's branch selection, and split attention's on the splits of one map;
- `attnzoo.kernels.strips`: the strip gates of coordinate attention and its relatives, and the strip
  means they pool;
- `attnzoo.kernels.softmax`: softmax over axes shorter than a vector register (outlook's 9
  neighbours), where torch's CPU softmax takes a slow path;
- `attnzoo.kernels.simam`: SimAM's parameter-free energy gate;
- `attnzoo.kernels.spectral`: GFNet's global filter, by FFT or by DFT matrix products;
- `attnzoo.kernels.choose`: which of two equally exact fast paths runs (calibrated once per
  shape class and cached, or overridden per site);
- `attnzoo.kernels.route`: where the kernels give way to plain ops (functorch transforms,
  ``torch.compile``, dispatch modes) and how their backward recomputes for ``create_graph=True``.
"""
