"""A stand-in for upstream TRELLIS with the same interface, generated into a temporary folder at test time.

TRELLIS cannot run here (CUDA-only extensions, not on PyPI) and its source is never carried by this
project, so the adapter is tested against this stand-in. It reproduces the parts of the interface the
adapter relies on, written from the documented behaviour, not copied:

- ``trellis.pipelines.TrellisImageTo3DPipeline`` with ``from_pretrained`` (local folder: ``pipeline.json``
  and ``ckpts/<name>.json``/``.safetensors``; anything else fails with upstream's misleading
  "Repository Not Found"), ``to``/``cuda``/``cpu``, ``preprocess_image``, ``get_cond``,
  ``sample_sparse_structure``, ``sample_slat``, ``decode_slat``, ``run``, ``run_multi_image`` (which, like
  upstream, patches the samplers and restores them only when sampling succeeds);
- samplers whose ``sample`` calls ``sample_once`` per step, which calls ``_inference_model``;
- ``trellis.representations.Gaussian.save_ply(path)`` / ``load_ply(path)`` and a mesh result;
- ``trellis.utils.postprocessing_utils.to_glb(app_rep, mesh, simplify, fill_holes, ..., texture_size)``
  returning a textured ``trimesh.Trimesh``;
- the CUDA extension modules (spconv, flash_attn, nvdiffrast, ...) and the other modules TRELLIS imports
  for background removal and the GLB export (rembg, utils3d, xatlas, pyvista, pymeshfix, igraph) as empty
  stubs, imported where upstream imports them, so a test can leave one out or make it fail to load;
- a fake CUDA build of ``torch`` with only what the preflight asks (:func:`write_fake_torch`), and
  :func:`run_preflight_module`, the container's ``python -m trellis_service.preflight`` against these fakes.

Every call is recorded in ``trellis.pipelines.trellis_image_to_3d.CALLS`` and
``trellis.utils.postprocessing_utils.CALLS``. Files are written under a temporary folder, never at a
tracked ``trellis/pipelines/`` path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Compiled and extra modules TRELLIS imports (and the preflight checks), written as stubs.
EXTENSIONS: tuple[str, ...] = (
    "spconv", "torchsparse", "flash_attn", "xformers", "nvdiffrast", "diff_gaussian_rasterization", "plyfile",
    "easydict", "utils3d", "xatlas", "pyvista", "pymeshfix", "igraph", "rembg",
)
#: Top-level module names the stand-in creates (for sys.modules cleanup).
TOP_LEVEL: tuple[str, ...] = ("trellis", *EXTENSIONS)

#: Default sub-models named in pipeline.json, as in the published TRELLIS-image-large layout.
MODELS: dict[str, str] = {
    "sparse_structure_decoder": "ckpts/ss_dec_conv3d_16l8_fp16",
    "sparse_structure_flow_model": "ckpts/ss_flow_img_dit_L_16l8_fp16",
    "slat_decoder_gs": "ckpts/slat_dec_gs_swin8_B_64l8gs32_fp16",
    "slat_decoder_mesh": "ckpts/slat_dec_mesh_swin8_B_64l8m256c_fp16",
    "slat_flow_model": "ckpts/slat_flow_img_dit_L_64l8p2_fp16",
}

_SPARSE = '''
import importlib
import os

# Like upstream, the backends are chosen from the environment when the module is first imported.
BACKEND = os.environ.get("SPARSE_BACKEND", "spconv")
ATTN = os.environ.get("SPARSE_ATTN_BACKEND", "flash_attn")
importlib.import_module("spconv.pytorch" if BACKEND == "spconv" else BACKEND)
importlib.import_module("xformers.ops" if ATTN == "xformers" else ATTN)
'''

_ATTENTION = '''
import importlib
import os

BACKEND = os.environ.get("ATTN_BACKEND", "flash_attn")
if BACKEND in ("flash_attn", "xformers"):
    importlib.import_module("xformers.ops" if BACKEND == "xformers" else BACKEND)
'''

_REPRESENTATIONS = '''
import numpy as np
import plyfile  # upstream imports it at module level; the stand-in stub is empty

PLY_PROPERTIES = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                  "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def expected_ply_bytes(count=256):
    """A small ball of Gaussians in save_ply's y-up frame: valid rotations, log scales, opacity logits and
    colours that change around the ball (so that a refinement has something to see)."""
    golden = np.pi * (3.0 - np.sqrt(5.0))
    k = np.arange(count)
    y = 1.0 - 2.0 * (k + 0.5) / count
    ring = np.sqrt(1.0 - y * y)
    xyz = 0.4 * np.stack([ring * np.cos(golden * k), y, ring * np.sin(golden * k)], axis=1)
    columns = {
        "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
        "nx": np.zeros(count), "ny": np.zeros(count), "nz": np.zeros(count),
        "f_dc_0": xyz[:, 0] * 3.0, "f_dc_1": xyz[:, 1] * 3.0, "f_dc_2": -xyz[:, 2] * 3.0,
        "opacity": np.full(count, 2.0),
        "scale_0": np.full(count, -2.6), "scale_1": np.full(count, -2.6), "scale_2": np.full(count, -2.6),
        "rot_0": np.ones(count), "rot_1": np.zeros(count), "rot_2": np.zeros(count), "rot_3": np.zeros(count),
    }
    header = "\\n".join(["ply", "format binary_little_endian 1.0", f"element vertex {count}"]
                        + [f"property float {p}" for p in PLY_PROPERTIES] + ["end_header", ""])
    table = np.stack([columns[p] for p in PLY_PROPERTIES], axis=1).astype("<f4")
    return header.encode("ascii") + table.tobytes()


#: save_ply's default frame change, and its quaternion (a quarter turn about x).
SAVE_TRANSFORM = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64)
QUARTER = np.sqrt(0.5)


def _read_table(path):
    with open(path, "rb") as handle:
        data = handle.read()
    end = data.index(b"end_header\\n") + len(b"end_header\\n")
    return np.frombuffer(data, dtype="<f4", offset=end).reshape(-1, len(PLY_PROPERTIES)).astype(np.float64)


def _write_table(path, table):
    header = "\\n".join(["ply", "format binary_little_endian 1.0", f"element vertex {len(table)}"]
                        + [f"property float {p}" for p in PLY_PROPERTIES] + ["end_header", ""])
    with open(path, "wb") as handle:
        handle.write(header.encode("ascii") + table.astype("<f4").tobytes())


def _turned(table):
    """The table in save_ply's frame: positions and normals turned, rotations composed with the turn."""
    out = table.copy()
    out[:, 0:3] = table[:, 0:3] @ SAVE_TRANSFORM.T
    out[:, 3:6] = table[:, 3:6] @ SAVE_TRANSFORM.T
    w, x, y, z = (table[:, 13 + k] for k in range(4))
    out[:, 13:17] = np.stack([QUARTER * (w - x), QUARTER * (x + w), QUARTER * (y - z), QUARTER * (z + y)], axis=1)
    return out


class Gaussian:
    """Upstream's constructor, ``init_params``, ``save_ply`` (frame change by default) and ``load_ply``, which,
    like upstream's, fails whenever it is given a transform (it reads ``rotation`` before assigning it)."""

    def __init__(self, aabb, sh_degree=0, mininum_kernel_size=0.0, scaling_bias=0.01, opacity_bias=0.1,
                 scaling_activation="exp", device="cuda"):
        self.init_params = {"aabb": aabb, "sh_degree": sh_degree, "mininum_kernel_size": mininum_kernel_size,
                            "scaling_bias": scaling_bias, "opacity_bias": opacity_bias,
                            "scaling_activation": scaling_activation}
        self.device = device
        self.saved_to = []
        self.loaded = []  # the tables of each load_ply (its own frame), in order
        self.table = None  # in TRELLIS's own (z-up) frame

    def save_ply(self, path, transform=[[1, 0, 0], [0, 0, -1], [0, 1, 0]]):
        self.saved_to.append(path)
        if transform is not None and not np.array_equal(np.array(transform), SAVE_TRANSFORM):
            raise NotImplementedError("the stand-in knows only the default transform")
        _write_table(path, _turned(self.table) if transform is not None else self.table)

    def load_ply(self, path, transform=[[1, 0, 0], [0, 0, -1], [0, 1, 0]]):
        table = _read_table(path)
        if transform is not None:
            raise UnboundLocalError("cannot access local variable 'rotation' where it is not associated with a value")
        self.table = table
        self.loaded.append(table)


def generated_gaussian():
    """What decode_slat returns: expected_ply_bytes() once save_ply has turned it."""
    gaussian = Gaussian(aabb=[-0.5, -0.5, -0.5, 1.0, 1.0, 1.0], mininum_kernel_size=9e-4, scaling_bias=0.004,
                        opacity_bias=0.1, scaling_activation="softplus")
    data = expected_ply_bytes()
    end = data.index(b"end_header\\n") + len(b"end_header\\n")
    turned = np.frombuffer(data, dtype="<f4", offset=end).reshape(-1, len(PLY_PROPERTIES)).astype(np.float64)
    table = turned.copy()  # undo the turn: inverse transform on points, conjugate turn on rotations
    table[:, 0:3] = turned[:, 0:3] @ SAVE_TRANSFORM
    table[:, 3:6] = turned[:, 3:6] @ SAVE_TRANSFORM
    w, x, y, z = (turned[:, 13 + k] for k in range(4))
    table[:, 13:17] = np.stack([QUARTER * (w + x), QUARTER * (x - w), QUARTER * (y + z), QUARTER * (z - y)], axis=1)
    gaussian.table = table
    return gaussian


class MeshExtractResult:
    def __init__(self, vertices, faces, vertex_attrs=None, res=64):
        self.vertices = vertices
        self.faces = faces.long()
        self.vertex_attrs = vertex_attrs
        self.res = res
        self.success = vertices.shape[0] != 0 and faces.shape[0] != 0


def extracted_mesh():
    import torch

    return MeshExtractResult(torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float32),
                             torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], dtype=torch.int32))
'''

_SAMPLERS = '''
from types import SimpleNamespace


class FlowEulerSampler:
    def __init__(self, sigma_min):
        self.sigma_min = sigma_min

    def _inference_model(self, model, x_t, t, cond=None, **kwargs):
        return 0.0

    def sample_once(self, model, x_t, t, t_prev, cond=None, **kwargs):
        pred = self._inference_model(model, x_t, t, cond, **kwargs)
        return SimpleNamespace(pred_x_prev=x_t + 1, pred_x_0=pred)

    def sample(self, model, noise, cond=None, steps=50, rescale_t=1.0, verbose=True, **kwargs):
        x = noise
        for i in range(steps):
            x = self.sample_once(model, x, 1 - i / steps, 1 - (i + 1) / steps, cond, **kwargs).pred_x_prev
        return SimpleNamespace(samples=x)


class FlowEulerCfgSampler(FlowEulerSampler):
    pass


class FlowEulerGuidanceIntervalSampler(FlowEulerSampler):
    pass
'''

_PIPELINE = '''
import json
import os
from contextlib import contextmanager

import rembg  # noqa: F401  (upstream imports it at module level for preprocess_image)
from PIL import Image

from ..modules import attention, sparse  # noqa: F401  (imports the configured extension modules)
from ..representations import extracted_mesh, generated_gaussian
from . import samplers

CALLS = []


def _record(name, **kwargs):
    CALLS.append((name, kwargs))


class TrellisImageTo3DPipeline:
    def __init__(self, models=None):
        self.models = models or {}
        self.sparse_structure_sampler = None
        self.slat_sampler = None
        self.sparse_structure_sampler_params = {}
        self.slat_sampler_params = {}
        self.moved_to = None

    @staticmethod
    def from_pretrained(path):
        _record("from_pretrained", path=path)
        if not os.path.exists(f"{path}/pipeline.json"):
            raise RuntimeError(f"Repository Not Found for url: https://huggingface.co/api/models/{path}")
        with open(f"{path}/pipeline.json") as handle:
            args = json.load(handle)["args"]
        models = {}
        for key, name in args["models"].items():
            if not (os.path.exists(f"{path}/{name}.json") and os.path.exists(f"{path}/{name}.safetensors")):
                repo = "/".join(f"{path}/{name}".split("/")[:2])
                raise RuntimeError(f"Repository Not Found for url: https://huggingface.co/{repo}/{name}.json")
            models[key] = name
        pipeline = TrellisImageTo3DPipeline(models)
        for kind in ("sparse_structure_sampler", "slat_sampler"):
            spec = args[kind]
            setattr(pipeline, kind, getattr(samplers, spec["name"])(**spec["args"]))
            setattr(pipeline, f"{kind}_params", dict(spec["params"]))
        return pipeline

    def to(self, device):
        _record("to", device=str(device))
        self.moved_to = str(device)

    def cuda(self):
        _record("cuda")
        self.moved_to = "cuda"

    def cpu(self):
        _record("cpu")
        self.moved_to = "cpu"

    def preprocess_image(self, input):
        _record("preprocess_image", size=input.size, mode=input.mode)
        return input.convert("RGB").resize((16, 16))

    def get_cond(self, image):
        _record("get_cond", count=len(image))
        return {"cond": list(range(len(image))), "neg_cond": [0]}

    def sample_sparse_structure(self, cond, num_samples=1, sampler_params={}):
        params = {**self.sparse_structure_sampler_params, **sampler_params}
        _record("sample_sparse_structure", num_samples=num_samples, params=params)
        out = self.sparse_structure_sampler.sample(None, 0, **cond, **params, verbose=True)
        return ("coords", out.samples)

    def sample_slat(self, cond, coords, sampler_params={}):
        params = {**self.slat_sampler_params, **sampler_params}
        _record("sample_slat", params=params)
        out = self.slat_sampler.sample(None, 0, **cond, **params, verbose=True)
        return ("slat", out.samples)

    def decode_slat(self, slat, formats=["mesh", "gaussian", "radiance_field"]):
        _record("decode_slat", formats=list(formats))
        result = {}
        if "mesh" in formats:
            result["mesh"] = [extracted_mesh()]
        if "gaussian" in formats:
            result["gaussian"] = [generated_gaussian()]
        return result

    def run(self, image, num_samples=1, seed=42, sparse_structure_sampler_params={}, slat_sampler_params={},
            formats=["mesh", "gaussian", "radiance_field"], preprocess_image=True):
        _record("run", image=image, num_samples=num_samples, seed=seed,
                sparse_structure_sampler_params=sparse_structure_sampler_params,
                slat_sampler_params=slat_sampler_params, formats=formats, preprocess_image=preprocess_image)
        if preprocess_image:
            image = self.preprocess_image(image)
        cond = self.get_cond([image])
        coords = self.sample_sparse_structure(cond, num_samples, sparse_structure_sampler_params)
        slat = self.sample_slat(cond, coords, slat_sampler_params)
        return self.decode_slat(slat, formats)

    @contextmanager
    def inject_sampler_multi_image(self, sampler_name, num_images, num_steps, mode="stochastic"):
        sampler = getattr(self, sampler_name)
        sampler._old_inference_model = sampler._inference_model
        if mode == "stochastic":
            order = [i % num_images for i in range(num_steps)]

            def _new_inference_model(self, model, x_t, t, cond, **kwargs):
                index = order.pop(0)
                return self._old_inference_model(model, x_t, t, cond=cond[index:index + 1], **kwargs)
        elif mode == "multidiffusion":
            def _new_inference_model(self, model, x_t, t, cond, **kwargs):
                preds = [self._old_inference_model(model, x_t, t, cond=cond[i:i + 1], **kwargs)
                         for i in range(len(cond))]
                return sum(preds) / len(preds)
        else:
            raise ValueError(f"Unsupported mode: {mode}")
        sampler._inference_model = _new_inference_model.__get__(sampler, type(sampler))
        yield  # like upstream: no try/finally, so an exception leaves the sampler patched
        sampler._inference_model = sampler._old_inference_model
        del sampler._old_inference_model

    def run_multi_image(self, images, num_samples=1, seed=42, sparse_structure_sampler_params={},
                        slat_sampler_params={}, formats=["mesh", "gaussian", "radiance_field"],
                        preprocess_image=True, mode="stochastic"):
        _record("run_multi_image", images=images, num_samples=num_samples, seed=seed,
                sparse_structure_sampler_params=sparse_structure_sampler_params,
                slat_sampler_params=slat_sampler_params, formats=formats,
                preprocess_image=preprocess_image, mode=mode)
        if preprocess_image:
            images = [self.preprocess_image(image) for image in images]
        cond = self.get_cond(images)
        ss_steps = {**self.sparse_structure_sampler_params, **sparse_structure_sampler_params}.get("steps")
        with self.inject_sampler_multi_image("sparse_structure_sampler", len(images), ss_steps, mode=mode):
            coords = self.sample_sparse_structure(cond, num_samples, sparse_structure_sampler_params)
        slat_steps = {**self.slat_sampler_params, **slat_sampler_params}.get("steps")
        with self.inject_sampler_multi_image("slat_sampler", len(images), slat_steps, mode=mode):
            slat = self.sample_slat(cond, coords, slat_sampler_params)
        return self.decode_slat(slat, formats)
'''

_POSTPROCESSING = '''
import diff_gaussian_rasterization  # noqa: F401
import igraph  # noqa: F401
import nvdiffrast.torch  # noqa: F401
import pymeshfix  # noqa: F401
import pyvista  # noqa: F401
import xatlas  # noqa: F401
import numpy as np
import trimesh
import trimesh.visual
from PIL import Image

CALLS = []


def to_glb(app_rep, mesh, simplify=0.95, fill_holes=True, fill_holes_max_size=0.04, texture_size=1024,
           debug=False, verbose=True):
    CALLS.append(("to_glb", {"app_rep": app_rep, "mesh": mesh, "simplify": simplify, "fill_holes": fill_holes,
                             "texture_size": texture_size}))
    box = trimesh.creation.box()
    uv = (box.vertices[:, :2] + 0.5).clip(0, 1)
    texture = Image.new("RGB", (texture_size, texture_size), (200, 120, 40))
    material = trimesh.visual.material.PBRMaterial(
        roughnessFactor=1.0, baseColorTexture=texture,
        baseColorFactor=np.array([255, 255, 255, 255], dtype=np.uint8))
    return trimesh.Trimesh(box.vertices, box.faces, visual=trimesh.visual.TextureVisuals(uv=uv, material=material))
'''


def _files(broken: Mapping[str, str]) -> dict[str, str]:
    files = {
        "trellis/__init__.py": "",
        "trellis/modules/__init__.py": "",
        "trellis/modules/sparse.py": _SPARSE,
        "trellis/modules/attention.py": _ATTENTION,
        "trellis/representations/__init__.py": _REPRESENTATIONS,
        "trellis/pipelines/__init__.py": "import easydict  # noqa: F401\n"
                                         "from .trellis_image_to_3d import TrellisImageTo3DPipeline  # noqa: F401\n",
        "trellis/pipelines/samplers.py": _SAMPLERS,
        "trellis/pipelines/trellis_image_to_3d.py": _PIPELINE,
        "trellis/utils/__init__.py": "",
        "trellis/utils/postprocessing_utils.py": "import utils3d  # noqa: F401\n" + _POSTPROCESSING,
        "nvdiffrast/__init__.py": "",
        "nvdiffrast/torch.py": "",
        "spconv/pytorch.py": "",
        "xformers/ops.py": "",
    }
    for name in EXTENSIONS:
        if name != "nvdiffrast":
            files[f"{name}/__init__.py"] = ""
    for name, error in broken.items():
        key = "nvdiffrast/torch.py" if name == "nvdiffrast" else f"{name}/__init__.py"
        files[key] = f"raise {error}\n"
    return files


def write_standin(root: Path, *, missing: Iterable[str] = (), broken: Mapping[str, str] | None = None,
                  without_trellis: bool = False) -> Path:
    """Write the stand-in packages under ``root`` and return ``root`` (to put on ``sys.path``).

    Args:
        root: An empty temporary folder.
        missing: Extension modules to leave out (e.g. ``{"spconv"}``).
        broken: Extension modules that raise at import, by name, e.g.
            ``{"flash_attn": "OSError('undefined symbol')"}``.
        without_trellis: Write only the extension stubs, not the ``trellis`` package.
    """
    skip = set(missing)
    for relative, text in _files(broken or {}).items():
        top = relative.split("/")[0]
        if top in skip or (without_trellis and top == "trellis"):
            continue
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def write_model_folder(folder: Path, *, models: Mapping[str, str] | None = None, omit: Iterable[str] = (),
                       pipeline_json: bool = True) -> Path:
    """A fake TRELLIS-image-large folder: pipeline.json and tiny ckpts files.

    Args:
        folder: Where to write it.
        models: Sub-models by key (default :data:`MODELS`).
        omit: ``ckpts/...`` files (with suffix) not to write, e.g. ``{"ckpts/ss_dec_conv3d_16l8_fp16.safetensors"}``.
        pipeline_json: Write pipeline.json at all.
    """
    models = dict(models or MODELS)
    sampler_params = {"steps": 25, "cfg_strength": 5.0, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}
    config = {
        "name": "TrellisImageTo3DPipeline",
        "args": {
            "models": models,
            "sparse_structure_sampler": {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
                                         "params": sampler_params},
            "slat_sampler": {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
                             "params": sampler_params},
            "slat_normalization": {"mean": [0.0] * 8, "std": [1.0] * 8},
            "image_cond_model": "dinov2_vitl14_reg",
        },
    }
    (folder / "ckpts").mkdir(parents=True, exist_ok=True)
    if pipeline_json:
        (folder / "pipeline.json").write_text(json.dumps(config))
    skipped = set(omit)
    for name in models.values():
        for suffix in (".json", ".safetensors"):
            if f"{name}{suffix}" not in skipped:
                (folder / f"{name}{suffix}").write_text("{}")
    return folder


def write_fake_torch(root: Path, *, gpus: int = 1, memory_gib: float = 24.0, capability: tuple[int, int] = (8, 9),
                     cuda: str | None = "12.1") -> Path:
    """A fake ``torch`` package under ``root`` with what the preflight asks of torch: ``__version__``,
    ``version.cuda``, ``cuda.is_available``, ``cuda.device_count`` and ``cuda.get_device_properties``.

    Args:
        root: Folder to put on the path (its own, so it never shadows the real torch by accident).
        gpus: Visible GPUs (0: ``is_available()`` is False).
        memory_gib: Each GPU's total memory.
        capability: Each GPU's compute capability (major, minor).
        cuda: The CUDA version of the build; None for a CPU-only build.
    """
    (root / "torch").mkdir(parents=True, exist_ok=True)
    (root / "torch" / "__init__.py").write_text(
        "import types\n"
        f"__version__ = '2.4.0+{'cu121' if cuda else 'cpu'}'\n"
        f"version = types.SimpleNamespace(cuda={cuda!r})\n"
        "class _Props:\n"
        f"    name = 'NVIDIA L4'; total_memory = int({memory_gib} * 2**30); major = {capability[0]}; "
        f"minor = {capability[1]}\n"
        "cuda = types.SimpleNamespace(\n"
        f"    is_available=lambda: {gpus > 0}, device_count=lambda: {gpus},\n"
        "    get_device_properties=lambda i: _Props())\n"
    )
    return root


def run_preflight_module(pythonpath: Iterable[Path], env: Mapping[str, str], *args: str
                         ) -> subprocess.CompletedProcess[str]:
    """``python -m trellis_service.preflight ARGS`` as the container entrypoint runs it, with ``pythonpath``
    (fakes first) and the repository on PYTHONPATH, this environment without TRELLIS settings, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLISBOX_", "ATTN_", "SPARSE_"))}
    base.update(env)
    base["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(REPO_ROOT)])
    return subprocess.run([sys.executable, "-m", "trellis_service.preflight", *args], env=base, capture_output=True,
                          text=True, timeout=60, check=False)


def purge_modules() -> None:
    """Forget every stand-in module so the next test imports a freshly written one."""
    for name in list(sys.modules):
        if name.split(".")[0] in TOP_LEVEL:
            del sys.modules[name]
