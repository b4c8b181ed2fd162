"""Batched folder decoding equals the per-image path, on real ImageNet photos when at hand."""
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from classfilters.data import DatasetError, FolderImages, load_image_folder
from classfilters.decode import decode_folder_batches


def _fake_folder(root):
    gen = torch.Generator().manual_seed(0)
    for c, (h, w) in (("n01", (300, 260)), ("n02", (240, 380))):
        (root / "val" / c).mkdir(parents=True)
        for i in range(3):
            img = torch.randint(0, 256, (3, h + 7 * i, w), dtype=torch.uint8, generator=gen)
            blob = encode_jpeg(img, quality=90) if i < 2 else encode_png(img)  # one PNG per class
            (root / "val" / c / f"{i}.{'JPEG' if i < 2 else 'png'}").write_bytes(blob.numpy().tobytes())


def test_batched_decoding_equals_the_per_image_path(tmp_path):
    _fake_folder(tmp_path)
    split = load_image_folder(tmp_path, "val")
    reference = torch.stack([split.dataset[i][0] for i in range(len(split))])
    batched = torch.cat(list(decode_folder_batches(split.dataset, 4, 0, len(split), "cpu")))
    assert batched.shape == (6, 3, 224, 224) and batched.dtype == torch.uint8
    assert torch.equal(batched, reference)
    assert torch.equal(torch.cat(list(decode_folder_batches(split.dataset, 4, 2, 5, "cpu"))), reference[2:5])


def test_interpolation_is_torchvision_s_and_part_of_the_fingerprint(tmp_path):
    """EfficientNet's weights expect bicubic resizing: the folder path uses it, PIL agrees within one
    grey level, the batched path equals it, and a bicubic split's fingerprint (which keys the
    feature caches) differs from the bilinear one's."""
    import torchvision.transforms.functional as F
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    _fake_folder(tmp_path)
    bilinear, bicubic = (load_image_folder(tmp_path, "val", 256, 224, mode) for mode in ("bilinear", "bicubic"))
    assert bilinear.fingerprint != bicubic.fingerprint
    images = torch.stack([bicubic.dataset[i][0] for i in range(len(bicubic))])
    assert not torch.equal(images, torch.stack([bilinear.dataset[i][0] for i in range(len(bilinear))]))
    pil = Image.open(bicubic.dataset.files[0]).convert("RGB")
    pil = F.center_crop(F.resize(pil, [256], interpolation=InterpolationMode.BICUBIC), [224, 224])
    assert (F.pil_to_tensor(pil).int() - images[0].int()).abs().max() <= 1
    assert torch.equal(torch.cat(list(decode_folder_batches(bicubic.dataset, 4, 0, len(bicubic), "cpu"))), images)
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        load_image_folder(tmp_path, "val", 256, 224, "cubic")


def test_real_photos(shared_data):
    files = sorted((shared_data / "imagenet-sample").glob("*.JPEG"))[:12]
    dataset = FolderImages(files, list(range(len(files))))
    reference = torch.stack([dataset[i][0] for i in range(len(files))])
    assert torch.equal(torch.cat(list(decode_folder_batches(dataset, 5, 0, len(files), "cpu"))), reference)


def test_corrupt_file_is_named(tmp_path):
    _fake_folder(tmp_path)
    (tmp_path / "val" / "n01" / "0.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    split = load_image_folder(tmp_path, "val")
    with pytest.raises(DatasetError, match="could not be decoded"):
        list(decode_folder_batches(split.dataset, 4, 0, len(split), "cpu"))


def _cmyk_jpeg(path, gen):
    from PIL import Image
    rgb = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=gen).numpy()
    Image.fromarray(rgb).convert("CMYK").save(path, "JPEG", quality=95)


def test_a_batch_the_gpu_decoder_refuses_is_decoded_image_by_image(tmp_path, monkeypatch):
    """nvJPEG refuses CMYK JPEGs (ImageNet's train split has some): the batch falls back to per-image
    CPU decoding and equals the reference path; a file that fails there too is named. The GPU
    decoder's refusal is simulated, so this runs on the CPU."""
    from classfilters import decode
    _fake_folder(tmp_path)
    _cmyk_jpeg(tmp_path / "val" / "n01" / "3.JPEG", torch.Generator().manual_seed(1))
    split = load_image_folder(tmp_path, "val")
    reference = torch.stack([split.dataset[i][0] for i in range(len(split))])
    calls = []

    def refusing(blobs, device):
        calls.append(len(blobs))
        raise RuntimeError("nvjpegDecodeBatchedInitialize failed: NVJPEG_STATUS_JPEG_NOT_SUPPORTED (simulated)")

    monkeypatch.setattr(decode, "_decode_jpeg_batch", refusing)
    batched = torch.cat(list(decode_folder_batches(split.dataset, 4, 0, len(split), "cpu")))
    assert calls == [3, 2] and torch.equal(batched, reference)
    (tmp_path / "val" / "n02" / "1.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match=r"n02/1.JPEG could not be decoded"):
        list(decode_folder_batches(split.dataset, 4, 0, len(split), "cpu"))


def test_gpu_decode_waits_for_the_current_stream(monkeypatch):
    """Before each nvJPEG decode the current CUDA stream is synchronised (checked without a GPU:
    the CUDA calls are replaced by recorders)."""
    import torchvision.io

    from classfilters import decode
    events = []

    class Stream:
        def synchronize(self):
            events.append("synchronize")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda blobs, mode, device: events.append("decode") or [])
    decode._decode_jpeg_batch([torch.zeros(3, dtype=torch.uint8)], torch.device("cuda"))
    assert events == ["synchronize", "decode"]


def test_a_subset_of_a_folder_keeps_the_folder_decode_path(tmp_path):
    """`subset` of a lazily decoded folder is still a `FolderImages` (so `max_train` keeps the GPU's
    batched decoding), with the chosen images and labels, and its own fingerprint."""
    from classfilters.features import batches
    _fake_folder(tmp_path)
    split = load_image_folder(tmp_path, "val")
    part = split.subset(torch.tensor([1, 3, 4]))
    assert isinstance(part.dataset, FolderImages) and len(part) == 3
    assert part.labels.tolist() == [0, 1, 1] and part.dataset.labels == [0, 1, 1]
    assert part.fingerprint not in (split.fingerprint, split.subset(torch.tensor([1, 3, 5])).fingerprint)
    reference = torch.stack([split.dataset[i][0] for i in (1, 3, 4)])
    assert torch.equal(torch.cat(list(decode_folder_batches(part.dataset, 2, 0, 3, "cpu"))), reference)
    assert torch.equal(torch.cat(list(batches(part, 2, num_workers=0))), reference)
