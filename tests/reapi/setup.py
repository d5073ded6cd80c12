"""Prepares the Python REAPI client for tests/reapi.rs, inside the venv that runs it.

    python setup.py OUT

Downloads the `buildstream` wheel from PyPI without installing it (it ships the REAPI v2
protos and the google/{bytestream,longrunning,rpc,api} protos they import), extracts the
.proto files to OUT/protos and generates message and gRPC stubs into OUT/gen with
grpcio-tools. Idempotent: a finished run leaves OUT/gen/.done.
"""
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

BUILDSTREAM = "buildstream==2.8.1"
KEEP = ("build/bazel/remote/execution/v2/", "build/bazel/semver/", "google/")
PREFIX = "buildstream/_protos/"


def main(out):
    done = os.path.join(out, "gen", ".done")
    if os.path.exists(done):
        return
    protos = os.path.join(out, "protos")
    gen = os.path.join(out, "gen")
    with tempfile.TemporaryDirectory() as tmp:
        # Any platform's wheel carries the same .proto files; these flags pick one wheel
        # whatever the local interpreter is.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", "--only-binary=:all:",
             "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
             "-d", tmp, BUILDSTREAM],
            check=True,
        )
        wheel = glob.glob(os.path.join(tmp, "buildstream-*.whl"))[0]
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                rel = name[len(PREFIX):]
                if name.startswith(PREFIX) and name.endswith(".proto") and rel.startswith(KEEP):
                    path = os.path.join(protos, rel)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(z.read(name))
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = sorted(
        os.path.relpath(os.path.join(d, f), protos)
        for d, _, fs in os.walk(protos)
        for f in fs
        if f.endswith(".proto")
    )
    os.makedirs(gen, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I" + protos, "-I" + include,
         "--python_out=" + gen, "--grpc_python_out=" + gen] + files,
        check=True,
    )
    open(done, "w").close()


if __name__ == "__main__":
    main(sys.argv[1])
