"Tests of dalle_course.mnist: the IDX reader, the shipped digits and their train/test split, full-MNIST folders."
import gzip, struct
from pathlib import Path

import numpy as np
import pytest

from dalle_course.core import InputError
from dalle_course.mnist import MNIST_NPZ, load_mnist, read_idx

SHIPPED = Path(__file__).resolve().parent.parent / 'data' / 'mnist_5k.npz'
FMT = {0x08: 'B', 0x09: 'b', 0x0B: 'h', 0x0C: 'i', 0x0D: 'f', 0x0E: 'd'}


def write_idx(path, arr, code=0x08):
    "An IDX file written from the format spec with struct, one element at a time (big-endian)."
    arr = np.asarray(arr)
    data = bytes([0, 0, code, arr.ndim]) + b''.join(struct.pack('>I', n) for n in arr.shape)
    data += b''.join(struct.pack('>' + FMT[code], v) for v in arr.ravel().tolist())
    if str(path).endswith('.gz'):
        with gzip.open(path, 'wb') as f: f.write(data)
    else: Path(path).write_bytes(data)


def shipped():
    with np.load(SHIPPED) as f: return f['images'], f['labels'].astype(np.int64)


# ---- IDX reader ----

@pytest.mark.parametrize('code,dtype', [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                                        (0x0D, np.float32), (0x0E, np.float64)])
@pytest.mark.parametrize('gz', [False, True])
def test_read_idx_types(tmp_path, code, dtype, gz):
    rng = np.random.default_rng(code)
    arr = (rng.standard_normal((3, 4, 2)) * 100).astype(dtype) if code >= 0x0D else \
        rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, (3, 4, 2), endpoint=True).astype(dtype)
    p = tmp_path / ('x.idx' + ('.gz' if gz else ''))
    write_idx(p, arr, code)
    back = read_idx(p)
    assert back.shape == (3, 4, 2) and back.dtype == np.dtype(dtype) and np.array_equal(back, arr)
    assert back.dtype.byteorder in '=|' or back.dtype.isnative  # native order, usable everywhere


def test_read_idx_mnist_like(tmp_path):
    imgs, labels = shipped()
    write_idx(tmp_path / 'i', imgs[:7]); write_idx(tmp_path / 'l.gz', labels[:7].astype(np.uint8))
    assert (tmp_path / 'i').read_bytes()[:4] == b'\x00\x00\x08\x03'
    assert np.array_equal(read_idx(tmp_path / 'i'), imgs[:7]) and np.array_equal(read_idx(tmp_path / 'l.gz'), labels[:7])


@pytest.mark.parametrize('content', [b'', b'\x00\x00', b'\x01\x00\x08\x01' + bytes(8), b'\x00\x00\x07\x01' + bytes(8),
                                     b'\x00\x00\x08\x02\x00\x00\x00\x02',  # header cut short
                                     b'\x00\x00\x08\x01\x00\x00\x00\x05abcd',  # one byte missing
                                     b'\x00\x00\x08\x01\x00\x00\x00\x05abcdef'])  # one byte too many
def test_read_idx_rejects_bad_files(tmp_path, content):
    (tmp_path / 'bad').write_bytes(content)
    with pytest.raises(InputError, match='bad'): read_idx(tmp_path / 'bad')


def test_read_idx_missing_and_broken_gzip(tmp_path):
    with pytest.raises(InputError, match='nothere'): read_idx(tmp_path / 'nothere')
    (tmp_path / 'x.gz').write_bytes(b'not gzip at all')
    with pytest.raises(InputError, match='x.gz'): read_idx(tmp_path / 'x.gz')


# ---- shipped digits ----

def test_default_path_is_shipped_file():
    assert MNIST_NPZ.resolve() == SHIPPED.resolve() and MNIST_NPZ.is_file()


def test_shipped_split_rule():
    imgs, labels = shipped()
    xtr, ytr, itr = load_mnist('train')
    xte, yte, ite = load_mnist('test')
    xa, ya, ia = load_mnist('all')
    assert xtr.shape == (4500, 28, 28) and xte.shape == (500, 28, 28) and xa.shape == (5000, 28, 28)
    for x, y, i in [(xtr, ytr, itr), (xte, yte, ite), (xa, ya, ia)]:
        assert x.dtype == np.uint8 and y.dtype == np.int64 and i.dtype == np.int64 and len(x) == len(y) == len(i)
        assert np.array_equal(imgs[i], x) and np.array_equal(labels[i], y)  # ids index the shipped file
    assert set(itr.tolist()).isdisjoint(ite.tolist()) and set(itr.tolist()) | set(ite.tolist()) == set(range(5000))
    assert np.array_equal(np.bincount(ya), [500] * 10)
    assert np.array_equal(np.bincount(ytr), [450] * 10) and np.array_equal(np.bincount(yte), [50] * 10)
    expected = set()  # brute force: for every class, its last 50 positions in the file
    for c in range(10):
        expected |= set([k for k in range(5000) if labels[k] == c][-50:])
    assert set(ite.tolist()) == expected
    assert np.array_equal(load_mnist()[2], itr)  # 'train' is the default


def test_bad_split():
    with pytest.raises(InputError, match='valid'): load_mnist('valid')
    with pytest.raises(InputError): load_mnist('Train')


def test_env_override(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 60).astype(np.uint8)  # 60 per class
    images = rng.integers(0, 256, (600, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / 'mnist_5k.npz', images=images, labels=labels)
    monkeypatch.setenv('DALLE_COURSE_DATA', str(tmp_path))
    xtr, ytr, itr = load_mnist('train'); xte, yte, ite = load_mnist('test')
    assert np.array_equal(np.bincount(ytr), [10] * 10) and np.array_equal(np.bincount(yte), [50] * 10)
    assert np.array_equal(xte, images[ite]) and ite.min() == 10  # class 0: rows 0-9 train, 10-59 test
    monkeypatch.setenv('DALLE_COURSE_DATA', str(tmp_path / 'empty'))
    with pytest.raises(InputError, match='empty'): load_mnist('train')


# ---- full MNIST IDX folders ----

def make_idx_folder(folder, n_train=23, n_test=11, gz_train=True, gz_test=False):
    imgs, labels = shipped()
    folder.mkdir(parents=True, exist_ok=True)
    tr, te = np.arange(0, 5000, 5000 // n_train)[:n_train], np.arange(2, 5000, 5000 // n_test)[:n_test]
    sfx = lambda gz: '.gz' if gz else ''
    write_idx(folder / f'train-images-idx3-ubyte{sfx(gz_train)}', imgs[tr])
    write_idx(folder / f'train-labels-idx1-ubyte{sfx(gz_train)}', labels[tr])
    write_idx(folder / f't10k-images-idx3-ubyte{sfx(gz_test)}', imgs[te])
    write_idx(folder / f't10k-labels-idx1-ubyte{sfx(gz_test)}', labels[te])
    return imgs, labels, tr, te


@pytest.mark.parametrize('gz_train,gz_test', [(True, False), (False, True), (False, False), (True, True)])
def test_idx_folder(tmp_path, gz_train, gz_test):
    imgs, labels, tr, te = make_idx_folder(tmp_path / 'mnist', gz_train=gz_train, gz_test=gz_test)
    x, y, i = load_mnist('train', tmp_path / 'mnist')
    assert np.array_equal(x, imgs[tr]) and np.array_equal(y, labels[tr]) and np.array_equal(i, np.arange(23))
    assert x.dtype == np.uint8 and y.dtype == np.int64 and i.dtype == np.int64
    x, y, i = load_mnist('test', str(tmp_path / 'mnist'))
    assert np.array_equal(x, imgs[te]) and np.array_equal(y, labels[te]) and np.array_equal(i, 60000 + np.arange(11))
    x, y, i = load_mnist('all', tmp_path / 'mnist')
    assert len(x) == 34 and len(set(i.tolist())) == 34 and np.array_equal(y, np.concatenate([labels[tr], labels[te]]))


def test_idx_folder_errors(tmp_path):
    with pytest.raises(InputError) as e: load_mnist('train', tmp_path / 'nowhere')
    msg = str(e.value)
    assert 'nowhere' in msg and 'train-images-idx3-ubyte' in msg and '--mnist' in msg and 'shipped' in msg
    make_idx_folder(tmp_path / 'm')
    (tmp_path / 'm' / 't10k-labels-idx1-ubyte').unlink()
    assert len(load_mnist('train', tmp_path / 'm')[0]) == 23  # train files are still fine
    with pytest.raises(InputError) as e: load_mnist('test', tmp_path / 'm')
    assert 't10k-labels-idx1-ubyte' in str(e.value) and str(tmp_path / 'm') in str(e.value) and '--mnist' in str(e.value)
    with pytest.raises(InputError): load_mnist('all', tmp_path / 'm')
    # labels that do not match the images in number
    write_idx(tmp_path / 'm' / 't10k-labels-idx1-ubyte', np.zeros(5, np.uint8))
    with pytest.raises(InputError): load_mnist('test', tmp_path / 'm')
    # images that are not 28x28
    write_idx(tmp_path / 'm' / 't10k-images-idx3-ubyte', np.zeros((5, 10, 10), np.uint8))
    with pytest.raises(InputError): load_mnist('test', tmp_path / 'm')
