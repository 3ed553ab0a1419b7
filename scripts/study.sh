# Sourced by the study scripts (scale_minilm_sst2.sh, ...): reads their arguments, [work dir] [--report-only], and
# sets repo, work (made absolute), out (results/$STUDY), report_only and CAP_DATA_DIR (default ../shared/data beside
# the repo). The caller sets STUDY, its results/ folder's name, first.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$repo/multiruns/$STUDY report_only=false
for arg in "$@"; do
    if [[ "$arg" == --report-only ]]; then report_only=true; else work=$arg; fi
done
mkdir -p "$work" && work=$(cd "$work" && pwd)
export CAP_DATA_DIR="${CAP_DATA_DIR:-$(cd "$repo/.." && pwd)/shared/data}"
out=$repo/results/$STUDY
