"""The dataset catalogue: MNIST and the data sets of the same form, and how to check them.

Each entry names its four IDX files, where to download them (HTTPS only), the published MD5 of
each download, the SHA-256 of the decompressed content where it is known, the image shape, the
class count and the sample counts. The content hash is what protects a run: gzip output depends
on the compressor (Debian's dataset-fashion-mnist recompresses the files, so their MD5s differ
from the published ones, while the content is the same).

`idx` (any four IDX files with MNIST's names) and `npz` (one .npz with x_train, y_train, x_test,
y_test) take other data: any image shape, labels 0..K-1, validated but with nothing to compare.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class Spec:
    name: str
    title: str                                    # what a citation would say
    files: dict = field(default_factory=lambda: dict(MNIST_FILES))   # split -> (images, labels)
    urls: tuple = ()                              # base URLs, tried in order
    md5_gz: dict = field(default_factory=dict)    # published MD5 of each NAME.gz download
    sha256: dict = field(default_factory=dict)    # SHA-256 of each file's decompressed content
    archive: tuple | None = None                  # (URL, MD5, folder inside) when shipped as one zip
    image_shape: tuple | None = (28, 28)          # None: whatever the files hold (idx, npz)
    num_classes: int | None = 10                  # None: largest label + 1
    counts: dict | None = None                    # split -> samples, when fixed
    transposed: bool = False                      # EMNIST stores each image transposed
    label_offset: int = 0                         # EMNIST letters are labelled 1..26
    format: str = "idx"                           # idx | npz
    # the normalisation under DP: constants fixed in advance, never the private training set's
    # statistics; a public data set's published ones, else DP_NORM
    dp_norm: tuple[float, float] | None = None

    @property
    def file_names(self) -> list[str]:
        return [name for pair in self.files.values() for name in pair]


def _emnist(subset: str, classes: int, train: int, test: int, offset: int = 0) -> Spec:
    files = {"train": (f"emnist-{subset}-train-images-idx3-ubyte", f"emnist-{subset}-train-labels-idx1-ubyte"),
             "test": (f"emnist-{subset}-test-images-idx3-ubyte", f"emnist-{subset}-test-labels-idx1-ubyte")}
    return Spec(f"emnist-{subset}", f"EMNIST {subset} (Cohen et al. 2017)", files=files,
                archive=("https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip",
                         "58c8d27c78d21e728a6bc7b3cc06412e", "gzip"),
                num_classes=classes, counts={"train": train, "test": test}, transposed=True,
                label_offset=offset)


CATALOGUE = {s.name: s for s in [
    Spec("mnist", "MNIST (LeCun et al. 1998)",
         urls=("https://ossci-datasets.s3.amazonaws.com/mnist/",
               "https://storage.googleapis.com/cvdf-datasets/mnist/"),
         md5_gz={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                 "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                 "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                 "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
         sha256={"train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                 "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                 "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                 "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"},
         counts={"train": 60000, "test": 10000}, dp_norm=(0.1307, 0.3081)),
    # Content hashes measured on Debian's dataset-fashion-mnist 0.0~git20200523 (upstream's files,
    # recompressed); the MD5s are the ones Zalando publishes for its .gz files.
    Spec("fashion-mnist", "Fashion-MNIST (Xiao et al. 2017)",
         urls=("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",),
         md5_gz={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                 "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                 "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                 "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
         sha256={"train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                 "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                 "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                 "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"},
         counts={"train": 60000, "test": 10000}, dp_norm=(0.2860, 0.3530)),
    Spec("kmnist", "Kuzushiji-MNIST (Clanuwat et al. 2018)",
         urls=("https://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
         md5_gz={"train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
                 "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
                 "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
                 "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134"},
         counts={"train": 60000, "test": 10000}),
    _emnist("digits", 10, 240000, 40000),
    _emnist("letters", 26, 124800, 20800, offset=1),
    _emnist("balanced", 47, 112800, 18800),
    Spec("idx", "any four IDX files with MNIST's names", image_shape=None, num_classes=None),
    Spec("npz", "one .npz with x_train, y_train, x_test, y_test", files={}, image_shape=None,
         num_classes=None, format="npz"),
]}


def get(name: str) -> Spec:
    from ..errors import UsageError

    try:
        return CATALOGUE[name]
    except KeyError:
        raise UsageError(f"--dataset {name!r}: unknown; choose from {', '.join(CATALOGUE)}") from None


MNIST_SPEC = CATALOGUE["mnist"]
MEAN, STD = 0.1307, 0.3081  # MNIST's training-set pixel statistics after /255 (measured in tests)
DP_NORM = (0.5, 0.5)        # under DP, a data set without published constants: [0, 1] -> [-1, 1]


def dp_normalisation(name: str) -> tuple[float, float]:
    """(mean, std) of a DP run's input normalisation: fixed in advance, not measured on the data."""
    return CATALOGUE[name].dp_norm or DP_NORM
SPLITS = MNIST_SPEC.files
FILES = MNIST_SPEC.file_names
SHA256 = MNIST_SPEC.sha256
MD5_GZ = MNIST_SPEC.md5_gz
URLS = list(MNIST_SPEC.urls)
IMAGE_SHAPE = (28, 28)
