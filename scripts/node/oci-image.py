#!/usr/bin/env python3
"""Writes a one-layer OCI image archive that `ctr images import` accepts, from local files,
with no Docker engine, buildah or registry. The image name is carried in index.json's
`io.containerd.image.name` annotation. Every entry has owner 0:0 and mtime 0, so the same
inputs give the same digests.

usage: oci-image.py OUT.tar NAME:TAG --entrypoint ARG... [--user UID:GID]
                    [--file SRC:DEST[:MODE]]... [--link TARGET:DEST]... [--dir DEST]...
"""
import argparse
import hashlib
import io
import json
import tarfile


def entry(tar, info, data=None):
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def layer(files, links, dirs):
    """The layer tar: every parent directory, then files, then symlinks."""
    parents = {d.strip("/") for d in dirs}
    for dest in [f[1] for f in files] + [l[1] for l in links]:
        parts = dest.strip("/").split("/")[:-1]
        parents.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(parents):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            entry(tar, info)
        for src, dest, mode in files:
            with open(src, "rb") as f:
                data = f.read()
            info = tarfile.TarInfo(dest.strip("/"))
            info.size, info.mode = len(data), mode
            entry(tar, info, data)
        for target, dest in links:
            info = tarfile.TarInfo(dest.strip("/"))
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            entry(tar, info)
    return out.getvalue()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("name")
    p.add_argument("--entrypoint", action="append", required=True)
    p.add_argument("--user", default="")
    p.add_argument("--file", action="append", default=[], help="SRC:DEST[:OCTAL MODE]")
    p.add_argument("--link", action="append", default=[], help="TARGET:DEST")
    p.add_argument("--dir", action="append", default=[])
    a = p.parse_args()

    files = []
    for spec in a.file:
        src, dest, *mode = spec.split(":")
        files.append((src, dest, int(mode[0], 8) if mode else 0o755))
    links = [tuple(spec.split(":", 1)) for spec in a.link]
    blob_layer = layer(files, links, a.dir)
    config = canonical({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": a.entrypoint,
            "User": a.user,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [digest(blob_layer)]},
        "history": [{"created_by": "scripts/node/oci-image.py"}],
    })
    manifest = canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(blob_layer), "size": len(blob_layer)}],
    })
    index = canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(manifest), "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": a.name,
                            "org.opencontainers.image.ref.name": a.name.rsplit(":", 1)[-1]},
        }],
    })
    with tarfile.open(a.out, "w") as out:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            entry(out, info)
        blobs = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
        blobs += [("blobs/sha256/" + digest(b)[7:], b) for b in (blob_layer, config, manifest)]
        for name, data in blobs:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            entry(out, info, data)
    print(a.name, digest(manifest))


if __name__ == "__main__":
    main()
