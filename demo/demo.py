#!/usr/bin/env python
"""Draw hierseg_d2 predictions on images (Detectron2's demo/demo.py, for every model of the project).

    python demo/demo.py --config-file configs/coco/panoptic-segmentation/hcformer_R50_bs16_50ep.yaml \
        --input images/*.jpg --output out/ [--hierarchy] [--confidence-threshold 0.5] \
        --opts MODEL.WEIGHTS /path/to/model_final.pth

    python demo/demo.py --config-file <cfg> --video-input video.mp4 --output out.mp4 [--hierarchy] --opts ...
    python demo/demo.py --config-file <cfg> --webcam [--output out/] --opts ...

Writes ``<output>/<name>.png`` (panoptic, else semantic and/or instance predictions drawn with
Detectron2's Visualizer and the names/colours of ``DATASETS.TEST[0]``) and, with ``--hierarchy``,
``<output>/<name>_hierarchy.png``: HCFormer's hard cluster boundaries at every level and the prediction.
With ``--video-input`` / ``--webcam`` every frame is drawn the same way and written as a video (``--output``
a file, or a directory that gets ``<video name>.mp4``; with ``--hierarchy`` also ``<output>_hierarchy.mp4``),
with a progress bar in frames per second. The codec is Detectron2's choice: x264 in .mkv when this OpenCV
can write it, else mp4v in .mp4 (opencv-python-headless has no x264). The webcam is also shown in a
window when OpenCV has GUI support (esc quits; Ctrl-C stops a headless run); ``--max-frames`` stops early.
"""
import argparse
import glob
import logging
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

import cv2
import numpy as np
import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # demo/predictor.py, as in Detectron2

from detectron2.utils.logger import setup_logger  # noqa: E402

from hierseg_d2.config import load_config  # noqa: E402
from hierseg_d2.data.dataset_mappers.utils import read_image_file  # noqa: E402
from hierseg_d2.data.datasets import add_register_argument  # noqa: E402
from predictor import VisualizationDemo  # noqa: E402


def setup_cfg(args):
    """Detectron2 + hierseg_d2 defaults, then the config file, then ``--opts``; frozen."""
    cfg = load_config(args.config_file, args.opts, register=args.register)
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description="hierseg_d2 demo: draw predictions on images")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--input", nargs="+",
                        help="image files, or a single glob pattern such as 'directory/*.jpg'")
    parser.add_argument("--output", default="output/demo",
                        help="a file or directory to save the drawings in; a directory when there are "
                             "several inputs (default: output/demo)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score for instance predictions to be shown")
    parser.add_argument("--hierarchy", action="store_true",
                        help="also write <name>_hierarchy.png: the hierarchical clustering strip (HCFormer)")
    add_video_arguments(parser)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="modify config options using the command-line 'KEY VALUE' pairs")
    return add_register_argument(parser)


def output_paths(path: str, output: str, many: bool):
    """(prediction PNG, hierarchy strip PNG) of one input image."""
    if many or os.path.isdir(output) or output.endswith(os.sep) or not os.path.splitext(output)[1]:
        name = os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(output, name + ".png")
    else:
        out = output
    return out, os.path.splitext(out)[0] + "_hierarchy.png"


def read_input(path: str, logger, unreadable: list):
    """The BGR image at ``path``, or None (the file is named in a warning and in ``unreadable``): one bad
    file must not stop the others."""
    try:
        return read_image_file(path, "BGR")
    except (OSError, ValueError) as e:
        logger.warning(f"skipping unreadable input {path}: {e}")
        unreadable.append(path)
        return None


def check_inputs_read(inputs, unreadable, logger) -> None:
    """Exit non-zero only when no input could be read; otherwise list the unreadable ones once more."""
    if unreadable and len(unreadable) == len(inputs):
        raise SystemExit(f"none of the {len(inputs)} input(s) could be read: {', '.join(unreadable[:10])}")
    if unreadable:
        logger.warning(f"{len(unreadable)} of {len(inputs)} inputs could not be read: {', '.join(unreadable[:10])}")


def empty_prediction_message(predictions, cfg, confidence_threshold: float):
    """Why nothing is drawn, or "" when something is: a panoptic output with no segment (every query
    below MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD or "no object"), or instances all below
    --confidence-threshold while no semantic map is drawn."""
    if "panoptic_seg" in predictions:
        if not predictions["panoptic_seg"][1]:
            return ("no panoptic segment above MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = "
                    f"{cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD} (the picture shows the bare image)")
        return ""
    if "instances" in predictions and "sem_seg" not in predictions:
        scores = predictions["instances"].scores
        if not bool((scores >= confidence_threshold).any()):
            best = f"{float(scores.max()):.3f}" if len(scores) else "none"
            return (f"no instance scores >= --confidence-threshold {confidence_threshold} (best: {best}; the "
                    "picture shows the bare image)")
    return ""


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="fvcore")
    logger = setup_logger()
    logger.info("Arguments: " + str(args))
    sources = [bool(args.input), bool(args.video_input), args.webcam]
    if sum(sources) != 1:
        parser.error("give exactly one of --input, --video-input and --webcam")
    cfg = setup_cfg(args)
    if args.video_input or args.webcam:
        return run_video(args, cfg, logger)

    inputs = args.input
    if len(inputs) == 1:
        inputs = sorted(glob.glob(os.path.expanduser(inputs[0])))
        if not inputs:
            raise FileNotFoundError(f"--input {args.input[0]!r} matches no file")
    demo = VisualizationDemo(cfg, hierarchy=args.hierarchy, confidence_threshold=args.confidence_threshold)
    many = len(inputs) > 1
    written, unreadable = [], []
    for path in tqdm.tqdm(inputs, disable=len(inputs) < 2):
        img = read_input(path, logger, unreadable)
        if img is None:
            continue
        start = time.time()
        predictions, vis, strip = demo.run_on_image(img)
        shown = [k for k in ("panoptic_seg", "sem_seg", "instances") if k in predictions]
        logger.info(f"{path}: {', '.join(shown)} in {time.time() - start:.2f}s")
        empty = empty_prediction_message(predictions, cfg, args.confidence_threshold)
        if empty:
            logger.warning(f"{path}: {empty}")
        out, strip_out = output_paths(path, args.output, many)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        if not cv2.imwrite(out, vis[:, :, ::-1]):
            raise OSError(f"could not write {out}")
        written.append(out)
        if strip is not None:
            cv2.imwrite(strip_out, strip[:, :, ::-1])
            written.append(strip_out)
    check_inputs_read(inputs, unreadable, logger)
    logging.getLogger("detectron2").info(f"wrote {len(written)} PNGs under {os.path.dirname(written[0]) or '.'}")
    return written


# ---------------- video and webcam (Detectron2's demo/demo.py) ----------------
def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video-input", metavar="FILE", help="a video file to draw the predictions on, frame by frame")
    parser.add_argument("--webcam", action="store_true",
                        help="take the frames from the first camera (cv2.VideoCapture(0))")
    parser.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0: all)")


def test_opencv_video_format(codec: str, file_ext: str) -> bool:
    """Whether this OpenCV build can write ``codec`` into a ``file_ext`` file (Detectron2's check)."""
    with tempfile.TemporaryDirectory(prefix="video_format_test") as d:
        filename = os.path.join(d, "test_file" + file_ext)
        writer = cv2.VideoWriter(filename, cv2.VideoWriter_fourcc(*codec), 30.0, (10, 10), True)
        for _ in range(30):
            writer.write(np.zeros((10, 10, 3), np.uint8))
        writer.release()
        return os.path.isfile(filename) and os.path.getsize(filename) > 0


def video_codec():
    """(fourcc, file extension): x264 in .mkv when OpenCV can write it, else mp4v in .mp4, as Detectron2."""
    if test_opencv_video_format("x264", ".mkv"):
        return "x264", ".mkv"
    warnings.warn("x264 codec not available, switching to mp4v")
    return "mp4v", ".mp4"


def video_output_path(output: str, basename: str, file_ext: str) -> str:
    """A directory (existing, ending with a separator or without an extension) gets ``<basename><ext>``;
    a file name is used as it is."""
    if os.path.isdir(output) or output.endswith(os.sep) or not os.path.splitext(output)[1]:
        return os.path.join(output, os.path.splitext(basename)[0] + file_ext)
    return output


def _gui_available() -> bool:
    try:  # opencv-python-headless has no window support
        cv2.namedWindow("hierseg_d2 probe")
        cv2.destroyWindow("hierseg_d2 probe")
        return True
    except cv2.error:
        return False


def run_video(args, cfg, logger):
    """Draw every frame of ``--video-input`` (or of the webcam) and write the drawn video (and, with
    ``--hierarchy``, ``<output>_hierarchy<ext>``); returns the paths written."""
    if args.webcam:
        video = cv2.VideoCapture(0)
        if not video.isOpened():
            raise RuntimeError("--webcam: no camera could be opened (cv2.VideoCapture(0) failed); connect a camera "
                               "or use --video-input FILE")
        basename, fps, num_frames = "webcam", 30.0, None
    else:
        if not os.path.isfile(args.video_input):
            raise FileNotFoundError(f"--video-input {args.video_input!r} does not exist")
        video = cv2.VideoCapture(args.video_input)
        if not video.isOpened():
            raise ValueError(f"--video-input {args.video_input!r}: OpenCV cannot read it as a video")
        basename = os.path.basename(args.video_input)
        fps = video.get(cv2.CAP_PROP_FPS) or 30.0
        num_frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        if args.max_frames > 0 and num_frames:
            num_frames = min(num_frames, args.max_frames)
    codec, file_ext = video_codec()
    out = video_output_path(args.output, basename, file_ext)
    if os.path.abspath(out) == os.path.abspath(args.video_input or ""):
        raise ValueError(f"--output {out!r} would overwrite the input video")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    strip_out = os.path.splitext(out)[0] + "_hierarchy" + os.path.splitext(out)[1]
    show = args.webcam and _gui_available()

    demo = VisualizationDemo(cfg, hierarchy=args.hierarchy, confidence_threshold=args.confidence_threshold)
    writers = {}
    frames = 0
    try:
        progress = tqdm.tqdm(demo.run_on_video(video, args.max_frames), total=num_frames, unit="frame")
        for vis, strip in progress:
            for path, image in ((out, vis), (strip_out, strip)):
                if image is None:
                    continue
                if path not in writers:  # frame size known once the first frame is drawn
                    writers[path] = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), float(fps),
                                                    (image.shape[1], image.shape[0]), True)
                    if not writers[path].isOpened():
                        raise OSError(f"could not open {path} for writing with codec {codec}")
                writers[path].write(image)
            frames += 1
            if show:
                cv2.imshow(basename, vis)
                if cv2.waitKey(1) == 27:  # esc to quit
                    break
    except KeyboardInterrupt:  # the way to stop a webcam without a window
        logger.info("interrupted")
    finally:
        video.release()
        for w in writers.values():
            w.release()
        if show:
            cv2.destroyAllWindows()
    if frames == 0:
        raise ValueError(f"{args.video_input or 'webcam'}: no frame could be read")
    logger.info(f"wrote {frames} frames to {', '.join(writers)} ({codec})")
    return list(writers)


if __name__ == "__main__":
    main()
