"""ShapesWorld: a procedural text-to-image world whose correctness can be measured exactly (docs/shapes.md).

world.py     scenes (shape, colour, size, position) and their anti-aliased rendering
captions.py  captions of a scene, the caption sets, the held-out split, and the caption parser
checker.py   the exact attribute checker (segmentation + geometry) and Wilson intervals
data.py      training data of the teacher (encoded captions + scenes rendered to match)
real.py      real data of data-aided SiD²ₐ: scenes rendered for the prompt shards' captions
pretrain.py  the teacher's flow-matching recipe behind `sid-fast pretrain`
evaluate.py  held-out prompts, teacher sampling and scoring
features.py  the feature network and the Fréchet distance in its feature space
grid.py      PNG grids with captions
"""

from sid_fast.shapes.captions import caption_set, captions_for, parse_caption
from sid_fast.shapes.checker import Score, check, detect, score, wilson_interval
from sid_fast.shapes.world import ObjectSpec, PromptSpec, Scene, render, render_batch, sample_scene

__all__ = ["ObjectSpec", "PromptSpec", "Scene", "Score", "caption_set", "captions_for", "check", "detect",
           "parse_caption", "render", "render_batch", "sample_scene", "score", "wilson_interval"]
