"""REAPI cases against a running sluice, with grpcio (grpc-core, the strictest common client:
a trailers-only status that is not framed right turns into UNKNOWN here).

    python cases.py GEN PORT [--tls CERT.pem] [--token SECRET] CASE...

Each case asserts and prints `ok CASE`; a failure raises with what differed. tests/reapi.rs
starts the server and runs them.
"""
import argparse
import hashlib
import os
import random
import sys
import time
import urllib.error
import urllib.request
import uuid


def args():
    p = argparse.ArgumentParser()
    p.add_argument("gen")
    p.add_argument("port", type=int)
    p.add_argument("--tls")
    p.add_argument("--token")
    p.add_argument("cases", nargs="+")
    return p.parse_args()


A = args()
sys.path.insert(0, A.gen)

import grpc  # noqa: E402
import zstandard  # noqa: E402
from build.bazel.remote.execution.v2 import remote_execution_pb2 as re  # noqa: E402
from build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc  # noqa: E402
from google.bytestream import bytestream_pb2 as bs  # noqa: E402
from google.bytestream import bytestream_pb2_grpc as bs_grpc  # noqa: E402

OPTIONS = [("grpc.max_receive_message_length", 16 << 20)]
if A.tls:
    creds = grpc.ssl_channel_credentials(root_certificates=open(A.tls, "rb").read())
    CHANNEL = grpc.secure_channel(
        f"127.0.0.1:{A.port}", creds,
        options=OPTIONS + [("grpc.ssl_target_name_override", "localhost")])
else:
    CHANNEL = grpc.insecure_channel(f"127.0.0.1:{A.port}", options=OPTIONS)
METADATA = [("authorization", f"Bearer {A.token}")] if A.token else None

CAPS = re_grpc.CapabilitiesStub(CHANNEL)
AC = re_grpc.ActionCacheStub(CHANNEL)
CAS = re_grpc.ContentAddressableStorageStub(CHANNEL)
BS = bs_grpc.ByteStreamStub(CHANNEL)
TIMEOUT = 30
EMPTY = hashlib.sha256(b"").hexdigest()


def digest(data):
    return re.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


RUN = uuid.uuid4().hex


def blob_data(seed, n):
    """Incompressible bytes, the same for the same seed within a run, new for every run."""
    return random.Random(f"{seed}-{RUN}").randbytes(n)


def log_text(n):
    return b"".join(b"line %d of a build log %s\n" % (i, RUN.encode()) for i in range(n))


def code_of(fn, *a, **kw):
    """The status code of a call that must fail."""
    try:
        r = fn(*a, **kw)
        if hasattr(r, "__iter__") and not isinstance(r, (bytes, str)) and not hasattr(r, "ListFields"):
            list(r)
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError(f"{fn} succeeded; an error was expected")


def expect(fn, code, *a, **kw):
    got, details = code_of(fn, *a, metadata=METADATA, timeout=TIMEOUT, **kw)
    assert got == code, f"expected {code}, got {got}: {details}"
    return details


def write(data, *, name=None, chunk=16384, zstd=False, offset=0, finish=True, instance=""):
    d = digest(data)
    prefix = f"{instance}/" if instance else ""
    kind = "compressed-blobs/zstd" if zstd else "blobs"
    name = name or f"{prefix}uploads/{uuid.uuid4()}/{kind}/{d.hash}/{d.size_bytes}"
    body = zstandard.ZstdCompressor(level=3).compress(data) if zstd else data
    return name, body, BS.Write(pieces(name, body, chunk, offset, finish), metadata=METADATA, timeout=TIMEOUT)


def pieces(name, body, chunk, offset=0, finish=True, start=0):
    at = start
    first = True
    while True:
        part = body[at:at + chunk]
        last = at + chunk >= len(body)
        yield bs.WriteRequest(resource_name=name if first else "", write_offset=offset + at - start,
                              data=part, finish_write=finish and last)
        first = False
        at += chunk
        if last:
            return


def read(name, offset=0, limit=0):
    return b"".join(r.data for r in BS.Read(bs.ReadRequest(resource_name=name, read_offset=offset,
                                                          read_limit=limit),
                                            metadata=METADATA, timeout=TIMEOUT))


def missing(*digests):
    r = CAS.FindMissingBlobs(re.FindMissingBlobsRequest(blob_digests=list(digests)),
                             metadata=METADATA, timeout=TIMEOUT)
    return {d.hash for d in r.missing_blob_digests}


def batch_update(*entries):
    reqs = [re.BatchUpdateBlobsRequest.Request(digest=d, data=data, compressor=c) for d, data, c in entries]
    r = CAS.BatchUpdateBlobs(re.BatchUpdateBlobsRequest(requests=reqs), metadata=METADATA, timeout=TIMEOUT)
    return [(x.digest.hash, x.status.code) for x in r.responses]


def http(method, path, body=None):
    url = f"http://127.0.0.1:{A.port}{path}"
    headers = {"Authorization": f"Bearer {A.token}"} if A.token else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ------------------------------------------------------------------------------ cases

def case_caps():
    c = CAPS.GetCapabilities(re.GetCapabilitiesRequest(), metadata=METADATA, timeout=TIMEOUT)
    cc = c.cache_capabilities
    assert list(cc.digest_functions) == [re.DigestFunction.SHA256], cc
    assert cc.action_cache_update_capabilities.update_enabled, cc
    assert list(cc.supported_compressors) == [re.Compressor.ZSTD], cc
    assert list(cc.supported_batch_update_compressors) == [re.Compressor.ZSTD], cc
    assert 0 < cc.max_batch_total_size_bytes < 4 << 20, cc
    assert (c.low_api_version.major, c.low_api_version.minor) == (2, 0), c
    assert (c.high_api_version.major, c.high_api_version.minor) == (2, 3), c
    # An instance name as the HTTP routes take it.
    CAPS.GetCapabilities(re.GetCapabilitiesRequest(instance_name="main/x"), metadata=METADATA, timeout=TIMEOUT)
    expect(CAPS.GetCapabilities, grpc.StatusCode.INVALID_ARGUMENT,
           re.GetCapabilitiesRequest(instance_name="blobs"))


def case_bytestream():
    data = blob_data("bs", 300_017)
    d = digest(data)
    assert missing(d) == {d.hash}
    name, _, r = write(data)
    assert r.committed_size == len(data), r
    assert missing(d) == set()
    plain = f"blobs/{d.hash}/{d.size_bytes}"
    assert read(plain) == data
    assert read(plain, offset=1000, limit=500) == data[1000:1500]
    assert read(plain, offset=len(data) - 10) == data[-10:]
    assert read(plain, offset=len(data)) == b""
    assert read(f"inst/a/blobs/{d.hash}/{d.size_bytes}", offset=5, limit=5) == data[5:10]
    expect(lambda **k: read(plain, offset=len(data) + 1), grpc.StatusCode.OUT_OF_RANGE)
    expect(lambda **k: read(plain, offset=-1), grpc.StatusCode.OUT_OF_RANGE)
    expect(lambda **k: read(plain, limit=-1), grpc.StatusCode.INVALID_ARGUMENT)
    # Writing what is already here finishes at once with the full size.
    _, _, again = write(data, chunk=1000)
    assert again.committed_size == len(data), again
    # The empty blob is always there.
    assert read(f"blobs/{EMPTY}/0") == b""
    assert missing(re.Digest(hash=EMPTY, size_bytes=0)) == set()
    # Absent, wrongly sized, malformed.
    other = digest(blob_data("absent", 10))
    expect(lambda **k: read(f"blobs/{other.hash}/10"), grpc.StatusCode.NOT_FOUND)
    expect(lambda **k: read(f"blobs/{d.hash}/{d.size_bytes + 1}"), grpc.StatusCode.NOT_FOUND)
    for bad in ["blobs/xyz/1", f"blobs/{d.hash}", f"blobs/{d.hash.upper()}/1", f"blobs/md5/{d.hash}/1",
                f"uploads/u/blobs/{d.hash}/1", f"actions/blobs/{d.hash}/1", f"compressed-blobs/lz4/{d.hash}/1"]:
        expect(lambda **k: read(bad), grpc.StatusCode.INVALID_ARGUMENT)
    # A body that does not hash to the digest: INVALID_ARGUMENT, nothing stored.
    wrong = blob_data("wrong", 5000)
    claimed = digest(blob_data("claimed", 5000))
    wname = f"uploads/{uuid.uuid4()}/blobs/{claimed.hash}/5000"
    expect(lambda **k: BS.Write(pieces(wname, wrong, 1000), **k), grpc.StatusCode.INVALID_ARGUMENT)
    assert missing(claimed) == {claimed.hash}
    # More bytes than the size, or fewer.
    expect(lambda **k: BS.Write(pieces(wname, wrong + b"x", 1000), **k), grpc.StatusCode.INVALID_ARGUMENT)
    expect(lambda **k: BS.Write(pieces(wname, wrong[:10], 1000), **k), grpc.StatusCode.INVALID_ARGUMENT)
    # A write with a wrong offset in its stream.
    def skipping():
        yield bs.WriteRequest(resource_name=wname, write_offset=0, data=wrong[:100])
        yield bs.WriteRequest(write_offset=200, data=wrong[100:], finish_write=True)
    expect(lambda **k: BS.Write(skipping(), **k), grpc.StatusCode.INVALID_ARGUMENT)
    expect(lambda **k: BS.Write(iter([bs.WriteRequest(resource_name=f"blobs/{d.hash}/1", data=b"x",
                                                      finish_write=True)]), **k),
           grpc.StatusCode.INVALID_ARGUMENT)


def case_zstd():
    data = log_text(40_000)
    d = digest(data)
    name, body, r = write(data, zstd=True)
    assert r.committed_size == len(body), (r, len(body))
    z = read(f"compressed-blobs/zstd/{d.hash}/{d.size_bytes}")
    assert len(z) < len(data) // 4, (len(z), len(data))
    assert zstandard.ZstdDecompressor().decompress(z, max_output_size=len(data)) == data
    assert read(f"blobs/{d.hash}/{d.size_bytes}") == data
    z = read(f"compressed-blobs/zstd/{d.hash}/{d.size_bytes}", offset=100_000)
    assert zstandard.ZstdDecompressor().decompress(z, max_output_size=len(data)) == data[100_000:]
    z = read(f"compressed-blobs/zstd/{EMPTY}/0")
    assert zstandard.ZstdDecompressor().decompress(z, max_output_size=1) == b""
    expect(lambda **k: read(f"compressed-blobs/zstd/{d.hash}/{d.size_bytes}", limit=10),
           grpc.StatusCode.INVALID_ARGUMENT)
    # Already here: a compressed write finishes at once with -1.
    _, _, again = write(data, zstd=True)
    assert again.committed_size == -1, again
    # Frames that do not decode, or decode to something else: INVALID_ARGUMENT, nothing stored.
    other = log_text(1000) + b"other"
    od = digest(other)
    oname = f"uploads/{uuid.uuid4()}/compressed-blobs/zstd/{od.hash}/{od.size_bytes}"
    expect(lambda **k: BS.Write(pieces(oname, b"not zstd at all" * 10, 50), **k), grpc.StatusCode.INVALID_ARGUMENT)
    expect(lambda **k: BS.Write(pieces(oname, zstandard.ZstdCompressor().compress(other[:-1] + b"X"), 50), **k),
           grpc.StatusCode.INVALID_ARGUMENT)
    truncated = zstandard.ZstdCompressor().compress(other)[:-5]
    expect(lambda **k: BS.Write(pieces(oname, truncated, 50), **k), grpc.StatusCode.INVALID_ARGUMENT)
    assert missing(od) == {od.hash}
    # Several frames in a row are one stream.
    two = zstandard.ZstdCompressor().compress(other[:500]) + zstandard.ZstdCompressor().compress(other[500:])
    r = BS.Write(pieces(oname, two, 64), metadata=METADATA, timeout=TIMEOUT)
    assert r.committed_size == len(two) and missing(od) == set(), r


def case_resume():
    data = blob_data("resume", 200_000)
    d = digest(data)
    name = f"uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"
    expect(BS.QueryWriteStatus, grpc.StatusCode.NOT_FOUND, bs.QueryWriteStatusRequest(resource_name=name))
    # The client stops without finish_write: the server keeps what it got.
    r = BS.Write(pieces(name, data[:64_000], 16_000, finish=False), metadata=METADATA, timeout=TIMEOUT)
    assert r.committed_size == 64_000, r
    q = BS.QueryWriteStatus(bs.QueryWriteStatusRequest(resource_name=name), metadata=METADATA, timeout=TIMEOUT)
    assert (q.committed_size, q.complete) == (64_000, False), q
    # A resume at another offset is refused and leaves the upload resumable.
    expect(lambda **k: BS.Write(pieces(name, data, 16_000, offset=32_000, start=32_000), **k),
           grpc.StatusCode.INVALID_ARGUMENT)
    # The stream is cut (the client cancels mid-write): still resumable.
    def cut():
        yield bs.WriteRequest(resource_name=name, write_offset=64_000, data=data[64_000:96_000])
        # Let the piece reach the server before the reset does.
        time.sleep(0.3)
        raise RuntimeError("client gives up")
    try:
        BS.Write(cut(), metadata=METADATA, timeout=TIMEOUT)
        raise AssertionError("a cut write succeeded")
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN), e
    # The server sees the reset a little later: wait for its state, not for a time.
    for _ in range(200):
        try:
            q = BS.QueryWriteStatus(bs.QueryWriteStatusRequest(resource_name=name), metadata=METADATA,
                                    timeout=TIMEOUT)
            if q.committed_size == 96_000:
                break
        except grpc.RpcError as e:
            # Between the server taking the upload back and parking it again.
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
        time.sleep(0.05)
    assert (q.committed_size, q.complete) == (96_000, False), q
    r = BS.Write(pieces(name, data, 16_000, offset=96_000, start=96_000), metadata=METADATA, timeout=TIMEOUT)
    assert r.committed_size == len(data), r
    assert read(f"blobs/{d.hash}/{d.size_bytes}") == data
    q = BS.QueryWriteStatus(bs.QueryWriteStatusRequest(resource_name=name), metadata=METADATA, timeout=TIMEOUT)
    assert (q.committed_size, q.complete) == (len(data), True), q
    # A compressed upload resumes at its compressed offset.
    text = log_text(20_000)
    td = digest(text)
    body = zstandard.ZstdCompressor().compress(text)
    zname = f"uploads/{uuid.uuid4()}/compressed-blobs/zstd/{td.hash}/{td.size_bytes}"
    half = len(body) // 2
    r = BS.Write(pieces(zname, body[:half], 1000, finish=False), metadata=METADATA, timeout=TIMEOUT)
    assert r.committed_size == half, r
    r = BS.Write(pieces(zname, body, 1000, offset=half, start=half), metadata=METADATA, timeout=TIMEOUT)
    assert r.committed_size == len(body), r
    assert read(f"blobs/{td.hash}/{td.size_bytes}") == text


def case_batch():
    small = [blob_data(f"b{i}", 4096) for i in range(5)]
    text = log_text(2000)
    td = digest(text)
    wrong_d = digest(blob_data("claimed-batch", 100))
    got = batch_update(
        *[(digest(b), b, re.Compressor.IDENTITY) for b in small],
        (td, zstandard.ZstdCompressor().compress(text), re.Compressor.ZSTD),
        (wrong_d, blob_data("other-batch", 100), re.Compressor.IDENTITY),
        (re.Digest(hash=EMPTY, size_bytes=0), b"", re.Compressor.IDENTITY),
        (td, b"garbage", re.Compressor.ZSTD),
        (re.Digest(hash="abc", size_bytes=3), b"abc", re.Compressor.IDENTITY),
    )
    codes = [c for _, c in got]
    assert codes == [0] * 6 + [3, 0, 3, 3], got
    assert missing(*[digest(b) for b in small], td, wrong_d) == {wrong_d.hash}
    absent = digest(blob_data("absent-batch", 50))
    r = CAS.BatchReadBlobs(re.BatchReadBlobsRequest(
        digests=[digest(small[0]), td, absent, re.Digest(hash=EMPTY, size_bytes=0)],
        acceptable_compressors=[re.Compressor.ZSTD]), metadata=METADATA, timeout=TIMEOUT)
    out = {x.digest.hash: x for x in r.responses}
    assert out[digest(small[0]).hash].data == small[0]
    assert out[digest(small[0]).hash].compressor == re.Compressor.IDENTITY  # random: stays plain
    t = out[td.hash]
    assert t.status.code == 0 and t.compressor == re.Compressor.ZSTD and len(t.data) < len(text) // 4, t.compressor
    assert zstandard.ZstdDecompressor().decompress(t.data, max_output_size=len(text)) == text
    assert out[absent.hash].status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert out[EMPTY].status.code == 0 and out[EMPTY].data == b""
    # Without zstd among the acceptable compressors, everything is plain.
    r = CAS.BatchReadBlobs(re.BatchReadBlobsRequest(digests=[td]), metadata=METADATA, timeout=TIMEOUT)
    assert r.responses[0].data == text and r.responses[0].compressor == re.Compressor.IDENTITY
    # Past max_batch_total_size_bytes: the whole call is refused.
    big = re.Digest(hash=td.hash, size_bytes=8 << 20)
    expect(CAS.BatchReadBlobs, grpc.StatusCode.INVALID_ARGUMENT, re.BatchReadBlobsRequest(digests=[big]))
    huge = blob_data("huge", 5 << 20)
    expect(CAS.BatchUpdateBlobs, grpc.StatusCode.INVALID_ARGUMENT, re.BatchUpdateBlobsRequest(requests=[
        re.BatchUpdateBlobsRequest.Request(digest=digest(huge), data=huge)]))
    # A FindMissingBlobs of 10,000 digests.
    many = [re.Digest(hash=hashlib.sha256(f"{RUN}-{i}".encode()).hexdigest(), size_bytes=i + 1)
            for i in range(10_000)]
    started = time.monotonic()
    m = missing(*many, digest(small[1]))
    took = time.monotonic() - started
    assert len(m) == 10_000 and digest(small[1]).hash not in m
    print(f"FindMissingBlobs of 10001 digests: {took * 1000:.1f} ms")
    expect(CAS.FindMissingBlobs, grpc.StatusCode.INVALID_ARGUMENT,
           re.FindMissingBlobsRequest(blob_digests=[re.Digest(hash="nothex", size_bytes=1)]))


def directory(files=(), dirs=()):
    return re.Directory(
        files=[re.FileNode(name=n, digest=d) for n, d in files],
        directories=[re.DirectoryNode(name=n, digest=d) for n, d in dirs])


def case_tree():
    f = blob_data("tree-file", 100)
    fd = digest(f)
    leaves = [directory(files=[(f"leaf{i}-{RUN}", fd)]) for i in range(4)]
    leaf_bytes = [x.SerializeToString() for x in leaves]
    mid = [directory(dirs=[(f"l{i}", digest(leaf_bytes[2 * j + i])) for i in range(2)]) for j in range(2)]
    mid_bytes = [x.SerializeToString() for x in mid]
    absent_dir = directory(files=[(f"absent-{RUN}", fd)]).SerializeToString()
    root = directory(files=[("f", fd)], dirs=[("m0", digest(mid_bytes[0])), ("m1", digest(mid_bytes[1])),
                                             ("gone", digest(absent_dir))])
    root_bytes = root.SerializeToString()
    entries = [(digest(b), b, re.Compressor.IDENTITY) for b in leaf_bytes + mid_bytes + [root_bytes, f]]
    assert all(c == 0 for _, c in batch_update(*entries))
    pages = list(CAS.GetTree(re.GetTreeRequest(root_digest=digest(root_bytes), page_size=3),
                             metadata=METADATA, timeout=TIMEOUT))
    dirs = [d for p in pages for d in p.directories]
    # Root, two mids, four leaves; the absent directory is left out.
    assert len(dirs) == 7, len(dirs)
    assert dirs[0] == root
    assert {x.SerializeToString() for x in dirs} == set(leaf_bytes + mid_bytes + [root_bytes])
    assert [len(p.directories) for p in pages] == [3, 3, 1], [len(p.directories) for p in pages]
    assert pages[-1].next_page_token == "" and pages[0].next_page_token
    rest = list(CAS.GetTree(re.GetTreeRequest(root_digest=digest(root_bytes), page_size=3,
                                              page_token=pages[0].next_page_token),
                            metadata=METADATA, timeout=TIMEOUT))
    assert [d for p in rest for d in p.directories] == dirs[3:]
    expect(lambda r, **k: list(CAS.GetTree(r, **k)), grpc.StatusCode.NOT_FOUND,
           re.GetTreeRequest(root_digest=digest(absent_dir)))
    expect(lambda r, **k: list(CAS.GetTree(r, **k)), grpc.StatusCode.INVALID_ARGUMENT,
           re.GetTreeRequest(root_digest=digest(root_bytes), page_token="nonsense"))


def store(data):
    d = digest(data)
    assert batch_update((d, data, re.Compressor.IDENTITY))[0][1] == 0
    return d


def case_ac():
    out = store(blob_data("ac-out", 3000))
    stdout = store(b"hello from the action " + RUN.encode())
    tree_file = store(blob_data("ac-tree-file", 700))
    tree = re.Tree(root=directory(files=[("x", tree_file)]))
    tree_d = store(tree.SerializeToString())
    action = digest(b"action " + RUN.encode())
    result = re.ActionResult(
        output_files=[re.OutputFile(path="bazel-out/bin/out", digest=out, is_executable=True)],
        output_directories=[re.OutputDirectory(path="bazel-out/bin/dir", tree_digest=tree_d)],
        stdout_digest=stdout, exit_code=0)
    expect(AC.GetActionResult, grpc.StatusCode.NOT_FOUND, re.GetActionResultRequest(action_digest=action))
    r = AC.UpdateActionResult(re.UpdateActionResultRequest(action_digest=action, action_result=result),
                              metadata=METADATA, timeout=TIMEOUT)
    assert r == result
    got = AC.GetActionResult(re.GetActionResultRequest(action_digest=action), metadata=METADATA, timeout=TIMEOUT)
    assert got == result, got
    # The instance name does not partition the cache (as on the HTTP routes).
    got = AC.GetActionResult(re.GetActionResultRequest(instance_name="ci/main", action_digest=action),
                             metadata=METADATA, timeout=TIMEOUT)
    assert got == result
    got = AC.GetActionResult(re.GetActionResultRequest(action_digest=action, inline_stdout=True,
                                                       inline_output_files=["bazel-out/bin/out"]),
                             metadata=METADATA, timeout=TIMEOUT)
    assert got.stdout_raw == b"hello from the action " + RUN.encode(), got.stdout_raw
    assert len(got.output_files[0].contents) == 3000
    # The same entry over HTTP: the serialized ActionResult.
    status, body = http("GET", f"/ac/{action.hash}")
    assert status == 200 and re.ActionResult.FromString(body) == result, status
    # Naming a blob the CAS lacks: FAILED_PRECONDITION, nothing stored.
    ghost = digest(blob_data("ghost", 10))
    bad = re.ActionResult(output_files=[re.OutputFile(path="a", digest=ghost)])
    other = digest(b"other action " + RUN.encode())
    details = expect(AC.UpdateActionResult, grpc.StatusCode.FAILED_PRECONDITION,
                     re.UpdateActionResultRequest(action_digest=other, action_result=bad))
    assert ghost.hash in details, details
    expect(AC.GetActionResult, grpc.StatusCode.NOT_FOUND, re.GetActionResultRequest(action_digest=other))
    # Malformed results and requests: INVALID_ARGUMENT.
    for malformed in [re.ActionResult(output_files=[re.OutputFile(path="/abs", digest=out)]),
                re.ActionResult(output_files=[re.OutputFile(path="a/../b", digest=out)]),
                re.ActionResult(output_files=[re.OutputFile(path="a")]),
                re.ActionResult(output_files=[re.OutputFile(path="a", digest=out), re.OutputFile(path="a", digest=out)]),
                re.ActionResult(stdout_digest=re.Digest(hash="XYZ", size_bytes=1))]:
        expect(AC.UpdateActionResult, grpc.StatusCode.INVALID_ARGUMENT,
               re.UpdateActionResultRequest(action_digest=other, action_result=malformed))
    expect(AC.GetActionResult, grpc.StatusCode.INVALID_ARGUMENT,
           re.GetActionResultRequest(action_digest=re.Digest(hash="short", size_bytes=1)))
    expect(AC.GetActionResult, grpc.StatusCode.INVALID_ARGUMENT,
           re.GetActionResultRequest(action_digest=action, instance_name="a//b"))
    expect(AC.GetActionResult, grpc.StatusCode.INVALID_ARGUMENT,
           re.GetActionResultRequest(action_digest=action, digest_function=re.DigestFunction.BLAKE3))
    # An HTTP client's /ac/ entry that names a blob the CAS lacks is a miss there too.
    status, _ = http("PUT", f"/ac/{other.hash}", bad.SerializeToString())
    assert status == 201, status
    assert http("GET", f"/ac/{other.hash}")[0] == 404
    assert http("HEAD", f"/ac/{other.hash}")[0] == 404
    expect(AC.GetActionResult, grpc.StatusCode.NOT_FOUND, re.GetActionResultRequest(action_digest=other))
    # Once the blob arrives the entry is whole.
    store(blob_data("ghost", 10))
    assert http("GET", f"/ac/{other.hash}")[0] == 200
    AC.GetActionResult(re.GetActionResultRequest(action_digest=other), metadata=METADATA, timeout=TIMEOUT)
    # An /ac/ entry that is not an ActionResult is served as is over HTTP, a miss over gRPC.
    junk = digest(b"junk " + RUN.encode())
    assert http("PUT", f"/ac/{junk.hash}", b"\xff\xff not a protobuf")[0] == 201
    assert http("GET", f"/ac/{junk.hash}") == (200, b"\xff\xff not a protobuf")
    expect(AC.GetActionResult, grpc.StatusCode.NOT_FOUND, re.GetActionResultRequest(action_digest=junk))


def case_http_shared():
    data = blob_data("shared", 70_000)
    d = digest(data)
    assert http("PUT", f"/cas/{d.hash}", data)[0] == 201
    assert missing(d) == set()
    assert read(f"blobs/{d.hash}/{d.size_bytes}") == data
    grpc_data = blob_data("shared-grpc", 90_000)
    gd = digest(grpc_data)
    write(grpc_data, instance="some/instance")
    assert http("GET", f"/cas/{gd.hash}") == (200, grpc_data)
    assert http("GET", f"/some/instance/cas/{gd.hash}") == (200, grpc_data)


def case_unimplemented():
    channel_method = CHANNEL.unary_unary("/build.bazel.remote.execution.v2.Execution/Execute",
                                         request_serializer=lambda x: x, response_deserializer=lambda x: x)
    try:
        list(channel_method(b"", timeout=TIMEOUT))
        raise AssertionError("Execute answered")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED, e
    split = CHANNEL.unary_unary("/build.bazel.remote.execution.v2.ContentAddressableStorage/SplitBlob",
                                request_serializer=lambda x: x, response_deserializer=lambda x: x)
    try:
        split(b"", metadata=METADATA, timeout=TIMEOUT)
        raise AssertionError("SplitBlob answered")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED, e


def case_evicted():
    """Run against a server with a small store_bytes_max (see tests/reapi.rs)."""
    out_data = blob_data("evict-out", 1 << 20)
    out = store(out_data)
    action = digest(b"evict action " + RUN.encode())
    result = re.ActionResult(output_files=[re.OutputFile(path="o", digest=out)])
    AC.UpdateActionResult(re.UpdateActionResultRequest(action_digest=action, action_result=result),
                          metadata=METADATA, timeout=TIMEOUT)
    AC.GetActionResult(re.GetActionResultRequest(action_digest=action), metadata=METADATA, timeout=TIMEOUT)
    # A lookup touches the blobs it checks, so the output is now as recent as the entry. Make
    # the output strictly the oldest (access times are in ms): store the entry again over HTTP,
    # which touches nothing else.
    time.sleep(0.05)
    assert http("PUT", f"/ac/{action.hash}", result.SerializeToString())[0] in (201, 204)
    time.sleep(0.05)
    for i in range(3):
        store(blob_data(f"evict-filler-{i}", 1 << 20))
        time.sleep(0.01)
    # Eviction runs in the background: wait for its effect (a FindMissingBlobs would touch
    # the output and so change what is evicted).
    for _ in range(400):
        if metric(b"sluice_store_evictions_total") >= 1:
            break
        time.sleep(0.05)
    assert out.hash in missing(out), "the output was not evicted"
    assert metric(b"sluice_store_evictions_total") == 1
    expect(AC.GetActionResult, grpc.StatusCode.NOT_FOUND, re.GetActionResultRequest(action_digest=action))
    assert http("GET", f"/ac/{action.hash}")[0] == 404
    # The action result itself is still stored: these misses are the completeness check's.
    assert metric(b"sluice_ac_incomplete_total") == 2


def metric(name):
    _, body = http("GET", "/metrics")
    for line in body.splitlines():
        if line.startswith(name + b" "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def case_auth_anonymous():
    """No token: reads of public `cas` work, reads of `ac` (read = token) and every write are refused."""
    d = digest(blob_data("auth", 100))
    c = CAPS.GetCapabilities(re.GetCapabilitiesRequest(), timeout=TIMEOUT)
    assert not c.cache_capabilities.action_cache_update_capabilities.update_enabled
    assert missing(d) == {d.hash}
    expect(AC.GetActionResult, grpc.StatusCode.UNAUTHENTICATED, re.GetActionResultRequest(action_digest=d))
    expect(CAS.BatchUpdateBlobs, grpc.StatusCode.UNAUTHENTICATED, re.BatchUpdateBlobsRequest(requests=[
        re.BatchUpdateBlobsRequest.Request(digest=d, data=b"x")]))
    expect(lambda **k: write(blob_data("auth", 100)), grpc.StatusCode.UNAUTHENTICATED)


def case_auth_token():
    """With the token given (--token): what it may do, and PERMISSION_DENIED beyond it."""
    c = CAPS.GetCapabilities(re.GetCapabilitiesRequest(), metadata=METADATA, timeout=TIMEOUT)
    update = c.cache_capabilities.action_cache_update_capabilities.update_enabled
    data = blob_data("auth-token", 100)
    d = digest(data)
    kind = os.environ.get("TOKEN_KIND")
    if kind == "rw":
        assert update
        write(data)
        AC.UpdateActionResult(re.UpdateActionResultRequest(action_digest=d, action_result=re.ActionResult(
            output_files=[re.OutputFile(path="p", digest=d)])), metadata=METADATA, timeout=TIMEOUT)
        AC.GetActionResult(re.GetActionResultRequest(action_digest=d), metadata=METADATA, timeout=TIMEOUT)
    elif kind == "ro":
        assert not update
        expect(lambda **k: write(data), grpc.StatusCode.PERMISSION_DENIED)
        expect(AC.UpdateActionResult, grpc.StatusCode.PERMISSION_DENIED,
               re.UpdateActionResultRequest(action_digest=d, action_result=re.ActionResult()))
        expect(AC.GetActionResult, grpc.StatusCode.NOT_FOUND, re.GetActionResultRequest(action_digest=d))
    elif kind == "cas-only":
        # Scoped to cas: writes blobs, may not touch the action cache.
        assert not update
        write(data)
        expect(AC.UpdateActionResult, grpc.StatusCode.PERMISSION_DENIED,
               re.UpdateActionResultRequest(action_digest=d, action_result=re.ActionResult()))
        details = expect(AC.GetActionResult, grpc.StatusCode.PERMISSION_DENIED,
                         re.GetActionResultRequest(action_digest=d))
        assert "namespace ac" in details, details
    elif kind == "wrong":
        expect(AC.GetActionResult, grpc.StatusCode.UNAUTHENTICATED, re.GetActionResultRequest(action_digest=d))
        expect(lambda **k: write(data), grpc.StatusCode.UNAUTHENTICATED)
    else:
        raise AssertionError(f"TOKEN_KIND {kind!r}")


for name in A.cases:
    globals()["case_" + name]()
    print(f"ok {name}", flush=True)
