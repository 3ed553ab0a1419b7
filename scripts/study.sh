# Sourced by the study scripts (scale_minilm_sst2.sh, ...): reads their arguments, [work dir] [--report-only]
# [--phase P], and sets repo, work (made absolute), out (results/$STUDY), report_only, phase and CAP_DATA_DIR
# (default ../shared/data beside the repo). The caller sets STUDY, its results/ folder's name, first.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$repo/multiruns/$STUDY report_only=false phase=both
while (($#)); do
    case "$1" in
        --report-only) report_only=true; shift ;;
        --phase) phase=$2; shift 2 ;;  # the studies with phases: select | dev | both (| mechanism)
        *) work=$1; shift ;;
    esac
done
mkdir -p "$work" && work=$(cd "$work" && pwd)
export CAP_DATA_DIR="${CAP_DATA_DIR:-$(cd "$repo/.." && pwd)/shared/data}"
out=$repo/results/$STUDY
# collect SWEEP OUT: the finished runs under a sweep dir into the committed OUT (collect_finished_runs.sh); without the
# sweep dir (a fresh clone, --report-only) OUT stays as committed and the report reads it
collect() {
    if [[ -d $1 ]]; then
        "$repo/scripts/collect_finished_runs.sh" "$@"
    else
        echo "note: no $1 here: the report reads the committed $2" >&2
    fi
}
