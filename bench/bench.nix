# Derivations for the benchmarks: a large path of mixed content, a chain-like closure of many small
# paths, a layered closure shaped like a real one, and `paths` large paths side by side.
{ nonce, sizeMb ? 1, paths ? 1, depth ? 20, width ? 50 }:
let
  sh = name: script: extra: derivation ({
    inherit name nonce;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
  } // extra);
  third = toString (sizeMb * 1000000 / 3);
  # A third each: incompressible, text, and machine code (the system's binaries, repeated).
  mixed = name: sh name ''
    mkdir $out
    head -c ${third} /dev/urandom > $out/random
    seq 1 1000000000 | head -c ${third} > $out/text
    for i in $(seq 1 100); do cat /usr/bin/* 2>/dev/null; done | head -c ${third} > $out/binaries
  '' {};
  big = mixed "bench-mixed";
  wide = sh "bench-wide-root" "echo $deps > $out" {
    deps = builtins.genList (i: mixed "bench-wide-${toString i}") paths;
  };
  # Each member references its predecessor and its "parent" i/2, so the last one's closure is all.
  many = builtins.genList (i: sh "bench-small-${toString i}" ''
    mkdir $out
    echo $deps > $out/refs
    seq ${toString i} 1000 > $out/data
  '' { deps = if i == 0 then [] else [ (builtins.elemAt many (i - 1)) (builtins.elemAt many (i / 2)) ]; }) paths;
  # `depth` levels of `width` paths; each references two paths of the level below; one root
  # references the top level. (depth * width + 1 paths, and depth + 1 narinfos deep.)
  level = builtins.genList (d: builtins.genList (i: sh "bench-layer-${toString d}-${toString i}" ''
    mkdir $out
    echo $deps > $out/refs
    seq ${toString (d * width + i)} 300 > $out/data
  '' { deps = if d == 0 then [] else
         let below = builtins.elemAt level (d - 1); in
         [ (builtins.elemAt below i) (builtins.elemAt below (i + 1 - width * ((i + 1) / width))) ]; })
    width) depth;
  layered = sh "bench-layered-root" "echo $deps > $out" { deps = builtins.elemAt level (depth - 1); };
in { inherit big layered wide; small = builtins.elemAt many (paths - 1); }
