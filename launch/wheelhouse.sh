#!/usr/bin/env bash
# Builds a wheelhouse: every wheel flaxbert needs, for a target machine without internet.
#
#   launch/wheelhouse.sh DIR [--python X.Y] [--platform TAG]... [--extras LIST] [--with PKGS]
#   launch/wheelhouse.sh DIR --only PKGS ...      # just these packages and their dependencies
#   launch/wheelhouse.sh --help
#
# Run it where pip can reach a package index; copy DIR to the target; there
#   pip install --no-index --find-links DIR flaxbert        # or 'flaxbert[test]'
# See "Offline install" in README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/wheelhouse.sh DIR [options]

Puts into DIR the wheels of flaxbert's dependencies (setup.cfg install_requires, plus the
chosen extras) for a target machine, and flaxbert's own wheel, so that on the target
  pip install --no-index --find-links DIR flaxbert
installs it without internet. Only wheels are fetched (pip download --only-binary=:all:):
a source archive would need a compiler and build tools on the target.

options:
  --python X.Y       the target's Python version (default: this Python's)
  --platform TAG     the target's platform tag (default: this machine's); may be repeated.
                     Linux x86_64: manylinux_2_28_x86_64 (glibc >= 2.28, e.g. Ubuntu 20.04+,
                     RHEL 8+; `ldd --version` on the target says), manylinux_2_27_x86_64,
                     manylinux2014_x86_64 (glibc 2.17: too old for jaxlib >= 0.7.1).
                     ARM Linux: manylinux_2_28_aarch64 / manylinux2014_aarch64.
                     Apple silicon: macosx_11_0_arm64. A manylinux_2_N tag also admits the
                     older glibc tags (manylinux_2_N-1 ... manylinux2014), as on the target.
  --extras LIST      setup.cfg extras to include, comma-separated (e.g. test,bench)
  --with PKGS        more requirements to download with flaxbert's, space-separated,
                     e.g. --with 'jax[cuda12]' for NVIDIA GPUs (about 3 GB of CUDA wheels)
  --only PKGS        download only PKGS (space-separated) and their dependencies, not
                     flaxbert's requirements: for an image that already has jax and the rest
                     (flaxbert's own wheel is still built, so `pip install --no-index
                     --find-links DIR flaxbert` there also checks nothing else is missing)
  --build PKGS       the source-only, pure-Python packages to build into wheels here first,
                     space-separated (default: promise, which tensorflow-datasets needs and
                     PyPI has only as a .tar.gz; --build '' for none); the wheels built
                     must be py3-none-any
  --project PATH     the project whose setup.cfg and wheel to use (default: this checkout)
  --no-deps          build the project's wheel only; download nothing
  --no-build-isolation
                     build wheels with the setuptools installed here instead of fetching
                     it (for a builder whose index lacks setuptools)
  --dry-run          print the pip commands instead of running them
  -h, --help         this text

Exit status: 0 done, 1 pip failed, 2 bad arguments.
EOF
}

die_usage() {
  echo "wheelhouse.sh: $1" >&2
  echo "usage: launch/wheelhouse.sh DIR [--python X.Y] [--platform TAG] [--extras LIST] [--only PKGS] (--help for all)" >&2
  exit 2
}

need_value() {  # flag, number of arguments left
  if [[ $2 -lt 2 ]]; then
    die_usage "$1 needs a value"
  fi
}

dir=""
python_version=""
platforms=()
extras=""
with_pkgs=()
only_pkgs=()
have_only=0
build_pkgs=(promise)
project=$(cd "$(dirname "$0")/.." && pwd)
no_deps=0
isolation=()
dry_run=0

while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --python) need_value "$1" $#; python_version=$2; shift 2 ;;
    --platform) need_value "$1" $#; platforms+=("$2"); shift 2 ;;
    --extras) need_value "$1" $#; extras=$2; shift 2 ;;
    --with) need_value "$1" $#; read -r -a more <<<"$2"; with_pkgs+=("${more[@]}"); shift 2 ;;
    --only) need_value "$1" $#; read -r -a more <<<"$2"; only_pkgs+=("${more[@]}"); have_only=1; shift 2 ;;
    --build) need_value "$1" $#; read -r -a build_pkgs <<<"$2"; shift 2 ;;
    --project) need_value "$1" $#; project=$2; shift 2 ;;
    --no-deps) no_deps=1; shift ;;
    --no-build-isolation) isolation=(--no-build-isolation); shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) die_usage "unknown flag '$1'" ;;
    *)
      if [[ -n $dir ]]; then
        die_usage "one DIR only, got '$dir' and '$1' (packages go in --only 'A B' or --with 'A B')"
      fi
      dir=$1; shift ;;
  esac
done
if [[ $# -gt 0 ]]; then
  if [[ -n $dir || $# -gt 1 ]]; then
    die_usage "unexpected arguments after '--': $*"
  fi
  dir=$1
fi
if [[ -z $dir ]]; then
  die_usage "missing DIR: the folder to put the wheels in (created if absent), e.g. launch/wheelhouse.sh dist/wheels"
fi
if [[ -n $python_version && ! $python_version =~ ^3\.[0-9]+$ ]]; then
  die_usage "--python '$python_version' is not X.Y (e.g. --python 3.12)"
fi
if [[ $have_only == 1 && ${#only_pkgs[@]} -eq 0 ]]; then
  die_usage "--only needs at least one package, e.g. --only 'tensorflow-datasets ml_collections'"
fi
if [[ $have_only == 1 && -n $extras ]]; then
  die_usage "--only and --extras do not mix: --extras names flaxbert's extras, which --only leaves out; list the packages in --only"
fi
if [[ $no_deps == 1 && ($have_only == 1 || -n $extras || ${#with_pkgs[@]} -gt 0) ]]; then
  die_usage "--no-deps downloads nothing, so --only, --extras and --with make no sense with it"
fi
if [[ ! -f $project/setup.cfg ]]; then
  die_usage "no setup.cfg in --project '$project'"
fi

py=${PYTHON:-python3}

# A manylinux_2_N machine also runs manylinux_2_M wheels for every M < N, but pip
# only takes the tags it is given (pip 23.2 does so), so name them all.
target_platforms=()
for tag in ${platforms[@]+"${platforms[@]}"}; do
  if [[ $tag =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
    glibc=${BASH_REMATCH[1]}
    arch=${BASH_REMATCH[2]}
    for ((m = glibc; m >= 17; m--)); do
      target_platforms+=("manylinux_2_${m}_${arch}")
    done
    target_platforms+=("manylinux2014_${arch}")
  else
    target_platforms+=("$tag")
  fi
done

# Requirements: flaxbert's (setup.cfg) plus extras plus --with, or just --only.
requirements=()
if [[ $no_deps == 0 ]]; then
  if [[ $have_only == 1 ]]; then
    requirements=("${only_pkgs[@]}")
  else
    reqs_text=$("$py" - "$project/setup.cfg" "$extras" <<'EOF'
import configparser
import sys

path, extras = sys.argv[1], [e.strip() for e in sys.argv[2].split(",") if e.strip()]
cfg = configparser.ConfigParser()
cfg.read(path)
def lines(section, key):
    if not cfg.has_option(section, key):
        return []
    return [l.strip() for l in cfg.get(section, key).splitlines()
            if l.strip() and not l.strip().startswith("#")]
reqs = lines("options", "install_requires")
known = cfg.options("options.extras_require") if cfg.has_section("options.extras_require") else []
for extra in extras:
    if extra not in known:
        sys.exit(f"wheelhouse.sh: --extras: '{extra}' is not an extra of {path} "
                 f"(its extras: {', '.join(known) or 'none'})")
    reqs += [r for r in lines("options.extras_require", extra) if r not in reqs]
print("\n".join(reqs))
EOF
    ) || exit 2
    if [[ -n $reqs_text ]]; then
      mapfile -t requirements <<<"$reqs_text"
    fi
  fi
  requirements+=(${with_pkgs[@]+"${with_pkgs[@]}"})
fi

target_flags=(--only-binary=:all:)
if [[ -n $python_version || ${#target_platforms[@]} -gt 0 ]]; then
  target_flags+=(--implementation cp)
  if [[ -n $python_version ]]; then
    target_flags+=(--python-version "$python_version")
  fi
  for tag in ${target_platforms[@]+"${target_platforms[@]}"}; do
    target_flags+=(--platform "$tag")
  done
fi

log=""
cleanup() {
  if [[ -n $log ]]; then rm -f "$log"; fi
}
trap cleanup EXIT
if [[ $dry_run == 0 ]]; then
  mkdir -p "$dir"
  log=$(mktemp)
fi

# Runs (or, with --dry-run, prints) one pip command; keeps its output in $log.
run() {
  if [[ $dry_run == 1 ]]; then
    printf '%q' "$1"
    shift
    printf ' %q' "$@"
    echo
    return 0
  fi
  echo "wheelhouse.sh: $*" >&2
  "$@" 2>&1 | tee "$log"
}

# Says what failed and what to do, from the pip output in $log.
explain_pip_failure() {
  local what=$1 missing
  echo >&2
  echo "wheelhouse.sh: pip failed while $what (the pip output above says more)." >&2
  missing=$(sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' "$log" | head -1)
  if [[ -n $missing ]]; then
    local version=$python_version where="this machine's platform"
    if [[ -z $version ]]; then
      version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    fi
    if [[ ${#platforms[@]} -gt 0 ]]; then
      where=${platforms[*]}
    fi
    echo "  no wheel of '$missing' for Python $version on $where." >&2
    echo "  Name the target's real platform, as new as it is: --platform manylinux_2_28_x86_64 for" >&2
    echo "  glibc >= 2.28 (jaxlib has had no manylinux2014 wheels since 0.7.1), macosx_14_0_arm64 for" >&2
    echo "  macOS 14+ (scipy and numpy need it); or another --python. If the package is published only" >&2
    echo "  as source (.tar.gz) and is pure Python, pass --build '${missing%%[<>=!~;]*}'." >&2
  elif grep -q "ResolutionImpossible\|conflicting dependencies" "$log"; then
    echo "  pip found no set of wheels that fits: a dependency named above (after 'depends on') has no" >&2
    echo "  wheel for this target. Pass the target's real --platform / --python, or, for a pure-Python" >&2
    echo "  package published only as source, --build NAME." >&2
  elif grep -qi "connection\|network\|resolve host\|timed out" "$log"; then
    echo "  pip could not reach the package index: run this where it can (or set PIP_INDEX_URL)." >&2
  fi
  exit 1
}

if [[ ${#requirements[@]} -gt 0 ]]; then
  # Source-only pure-Python packages: built into py3-none-any wheels here, where the resolver
  # of the next step finds them (--find-links), since a cross-target download takes wheels only.
  if [[ ${#build_pkgs[@]} -gt 0 ]]; then
    run "$py" -m pip wheel --no-deps ${isolation[@]+"${isolation[@]}"} --wheel-dir "$dir" \
      "${build_pkgs[@]}" || explain_pip_failure "building wheels of ${build_pkgs[*]}"
  fi
  if [[ $dry_run == 0 ]]; then
    for pkg in ${build_pkgs[@]+"${build_pkgs[@]}"}; do
      name=$(echo "$pkg" | sed 's/[][<>=!~;, ].*//' | tr '[:upper:]-' '[:lower:]_')
      for whl in "$dir"/*.whl; do
        base=$(basename "$whl" | tr '[:upper:]-' '[:lower:]_')
        if [[ $base == "${name}"_[0-9]* && $base != *_none_any.whl ]]; then
          echo "wheelhouse.sh: --build $pkg gave $(basename "$whl"), a wheel for this machine only;" >&2
          echo "  it has compiled parts, so it needs a wheel for the target: pick a version that has one." >&2
          exit 1
        fi
      done
    done
  fi
  run "$py" -m pip download "${target_flags[@]}" --find-links "$dir" --dest "$dir" \
    "${requirements[@]}" || explain_pip_failure "downloading the dependencies"
fi
run "$py" -m pip wheel --no-deps ${isolation[@]+"${isolation[@]}"} --wheel-dir "$dir" "$project" \
  || explain_pip_failure "building the wheel of $project"

if [[ $dry_run == 0 ]]; then
  name=$("$py" -c 'import configparser, sys; c = configparser.ConfigParser(); c.read(sys.argv[1]); print(c.get("metadata", "name", fallback="<project>"))' "$project/setup.cfg")
  count=$(find "$dir" -maxdepth 1 -name '*.whl' | wc -l)
  echo
  echo "wheelhouse.sh: $count wheels, $(du -sh "$dir" | cut -f1), in $dir. On the target:"
  install=("$name")
  if [[ $have_only == 1 ]]; then
    install=("${only_pkgs[@]}" "$name")
  elif [[ -n $extras ]]; then
    install=("${name}[${extras}]")
  fi
  install+=(${with_pkgs[@]+"${with_pkgs[@]}"})
  printf '  pip install --no-index --find-links %q' "$dir"
  printf ' %q' "${install[@]}"
  echo
fi
