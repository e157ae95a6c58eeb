"""ssopd-verl: Self-Supervised On-Policy Distillation (SSOPD) as a verl 0.9.1 recipe.

The algorithm lives in small pure modules that never import verl: `pairing` (frontier weight, witness and target
selection), `teacher_context` (the self-teacher's input ids), `losses` (the clipped forward KL, reference and
chunked), `distill_plan` (a scored batch to per-row distillation inputs) and `config` (the `ssopd:` block).
Everything that touches verl is in `ssopd_verl.glue`, loaded by verl itself through the `verl.plugins` entry point.
"""

__version__ = "0.1.0"
