"""Performance benchmark: one table of training, data, inference, map and memory figures.

    python -m tools.benchmark [--quick] [--device cpu|cuda] [--amp] [--out FILE.md]
                                [--base-channels 64] [--sizes 128 240] [--batch-size 16] [--ks 1 2 4]
                                [--repeats N] [--warmup N] [--threads N] [--clock wall|process]
                                [--parts training,data,inference,maps,memory,gpu] [--profile FILE.md]

Results, targets and profiles of this machine: docs/performance.md.

Everything is measured side by side in the same run on the same networks and inputs, and
printed as ONE markdown table headed by the machine (CPU, cores, torch threads, GPU,
versions, load). Rows:

- training: slices/s of the real `CMERTrainer` (its `_iteration`, ignite engine, a
  StatsHandler logging every loss term) for K = 1, 2, 4 modality networks, with the
  overhead ratio = step time / the bare networks' forward + backward over the same 2B
  slices with a plain loss, and a reference step written the way the authors' code works
  (two forwards per network, one backward and optimiser step per network in turn, each
  network's loss recomputed with the others' maps detached). Ours, bare and reference run
  one after the other on fresh networks, each with its own warm-up steps.
  Transform kinds are cycled (translation, scale at its largest, rotation, flip) with fixed
  parameters, so R repeats measure the first R kinds, the most expensive first.
- data: slices/s the training DataLoader (SliceDataset over VolumeCache, train.yaml's
  batch size and workers) delivers from the cache versus what training consumes (K = 4 at
  the largest size), and the time to decode + cache one BraTS-size subject (synthetic
  240x240x155 NIfTI files written with nibabel).
- inference: seconds per four-modality volume end to end (configs/inference.yaml through
  MONAI's ConfigParser: read, preprocess, maps, fusion, invert, write), against the bare
  networks' forward over the same slices.
- maps: GradCAM++ slices/s, `scripts.model.cams.gradcampp_maps` (batched) versus MONAI's
  `GradCAMpp` (one slice at a time) and pytorch-grad-cam when installed, with the maximum
  difference of the normalised maps (computed without TF32).
- memory: peak RSS (and peak GPU memory) of training K = 4 at the largest size, ours and
  the bare networks, each in its own subprocess so that peaks do not mix.
- gpu path (cuda only): every op of one training step is audited (TorchDispatchMode): ops
  producing data-sized CPU tensors (a fallback) and host syncs, attributed to their caller.

`--quick` uses tiny sizes (32x32, base 4, one repeat) so CI checks that it runs. Speeds are
never asserted anywhere. Needs only torch, monai, ignite, nibabel and numpy (PyYAML for
the inference config, with a fallback to the same pieces without it).
"""
