"""tools/visualize_sia_clusters.py: the colouring of the SIA cluster map and the end-to-end command."""
import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VISUALIZER = REPO / "tools" / "visualize_sia_clusters.py"


def load_tool(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cluster_map_rendering_colours_each_cluster():
    vis = load_tool(VISUALIZER)
    image = np.zeros((40, 72, 3), dtype=np.uint8)
    ids = np.array([[0, 1, 1], [2, 2, 0]])  # a 2 x 3 stride-16 grid of a 32 x 48 network input
    out = vis.render_cluster_map(image, ids, (32, 48), alpha=1.0)
    palette = vis.cluster_palette(3)
    assert out.shape == (40, 72, 3)
    # original pixel (y, x) -> network pixel (y * 32/40, x * 48/72) -> cell // 16; cell interiors
    np.testing.assert_array_equal(out[5, 5], palette[0])
    np.testing.assert_array_equal(out[5, 40], palette[1])
    np.testing.assert_array_equal(out[35, 10], palette[2])
    np.testing.assert_array_equal(out[35, 60], palette[0])
    np.testing.assert_array_equal(out[5, 24], [255, 255, 255])  # border between clusters 0 and 1 at x = 24


def test_visualize_tool_writes_a_png_over_the_image(tmp_path):
    import cv2

    vis = load_tool(VISUALIZER)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "img.png"), rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    config = REPO / "configs/ade20k/semantic-segmentation/hafa/hcformer_hafa_pvt_v2_b1_bs16_160k.yaml"
    vis.main(["--config-file", str(config), "--input", str(tmp_path / "img.png"), "--output", str(tmp_path / "vis"),
              "--opts", "MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
              "MODEL.HAFA.DEPTHS", "[1, 1, 1, 1]"])
    out = cv2.imread(str(tmp_path / "vis" / "img_sia.png"))
    assert out is not None and out.shape == (90, 120, 3)
