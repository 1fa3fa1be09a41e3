"""modules/devices.py as the WebUI sets it up on a CPU run with full precision (--use-cpu all --no-half):
device cpu, every dtype float32, autocast() a no-op. Tests may rebind device/dtype* to mimic fp16."""
import contextlib

import torch

cpu = torch.device("cpu")
device = device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = dtype_vae = dtype_unet = dtype_inference = torch.float32
unet_needs_upcast = False
force_fp16 = False
fp8 = False


def get_optimal_device():
    return cpu


def torch_gc():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cond_cast_unet(input):
    if force_fp16:
        return input.to(torch.float16)
    return input.to(dtype_unet) if unet_needs_upcast else input


def cond_cast_float(input):
    return input.float() if unet_needs_upcast else input


def autocast(disable=False):
    if disable or force_fp16 or dtype == torch.float32 or dtype_inference == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda")


def without_autocast(disable=False):
    return torch.autocast("cuda", enabled=False) if torch.is_autocast_enabled() and not disable else contextlib.nullcontext()


class NansException(Exception):
    pass


def test_for_nans(x, where):
    if torch.isnan(x[(0, ) * len(x.shape)]) and torch.all(torch.isnan(x)):
        raise NansException(f"A tensor with all NaNs was produced in {where}.")
