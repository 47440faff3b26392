#!/usr/bin/env bash
# Writes OCI image archives of the agent and the operator without a Docker engine:
#
#   images.sh OUT_DIR     -> OUT_DIR/crashwatch-agent.tar, OUT_DIR/crashwatch-operator.tar
#
# Each image is the Dockerfile's target of the same name, built from the same stripped
# release binary: the binary at /usr/bin/crashwatch-COMPONENT as the entrypoint, the shared
# libraries it links (what distroless/cc provides), and the CA bundle (https debuginfod and the
# API server). The agent runs as root, the operator as 65532:65532, as in the Dockerfile.
# Images are tagged as the chart names them by default (values.yaml image.registry and
# image.repository, Chart.yaml appVersion), so after `scripts/cluster.sh load` a plain
# `helm install` uses them with imagePullPolicy IfNotPresent.
set -euo pipefail
out=${1:?usage: images.sh OUT_DIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)

# chart_value FILE KEY: a top-level (or image.KEY) scalar of the chart's YAML.
chart_value() {
  python3 - "$1" "$2" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
match = re.search(r'^\s*' + re.escape(sys.argv[2]) + r':\s*"?([^"\s#]+)"?', text, re.M)
print(match.group(1) if match else "")
PY
}
chart=$repo/charts/crashwatch
tag=$(chart_value "$chart/Chart.yaml" appVersion)
registry=$(chart_value "$chart/values.yaml" registry)
repository=$(chart_value "$chart/values.yaml" repository)
[[ -n $tag && -n $registry && -n $repository ]] || { echo "images.sh: cannot read the chart's image name" >&2; exit 1; }

(cd "$repo" && cargo build --release --locked -p node-agent -p operator)
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
for component in agent operator; do
  binary=$staging/crashwatch-$component
  cp "$repo/target/release/crashwatch-$component" "$binary"
  strip "$binary"
  files=(--file "$binary:/usr/bin/crashwatch-$component"
    --file "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:644")
  # The dynamic loader and every library the binary links, at the paths it links them by.
  for lib in $(ldd "$binary" | awk '$3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    files+=(--file "$(readlink -f "$lib"):$lib")
  done
  user=()
  [[ $component == operator ]] && user=(--user 65532:65532)
  python3 "$repo/scripts/node/oci-image.py" "$out/crashwatch-$component.tar" \
    "$registry/$repository-$component:$tag" --entrypoint "/usr/bin/crashwatch-$component" \
    "${files[@]}" "${user[@]}" --dir /tmp --dir /proc --dir /sys --dir /dev
done
ls -l "$out"/crashwatch-*.tar >&2
