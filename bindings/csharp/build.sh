#!/usr/bin/env bash
# Builds the C# bindings with Mono's mcs: bin/Gllm.dll (the client, only System.*) and bin/BindingsTest.exe.
#   bindings/csharp/build.sh [OUT_DIR]        (default: bindings/csharp/bin)
# Unity/ and Godot/ need the engines' assemblies, so they stay out of Gllm.dll; they are only compiled
# against stand-ins of the engine types they use (Tests/EngineStubs), into a throwaway EngineLayers.dll.
# Needs the Debian packages mono-mcs and mono-runtime (apt-get install -y mono-mcs mono-runtime).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/bin}"
mkdir -p "$out"
# C# 7 keeps the sources within what Unity 2021 LTS and Godot 4 .NET both compile.
mcs -langversion:7 -target:library -warnaserror+ -nowarn:1591 -doc:"$out/Gllm.xml" \
    -out:"$out/Gllm.dll" "$here"/Gllm/*.cs
mcs -langversion:7 -warnaserror+ -r:"$out/Gllm.dll" -r:System.Core.dll \
    -out:"$out/BindingsTest.exe" "$here"/Tests/*.cs
mcs -langversion:7 -target:library -warnaserror+ -r:"$out/Gllm.dll" \
    -out:"$out/EngineLayers.dll" "$here"/Unity/*.cs "$here"/Godot/*.cs "$here"/Tests/EngineStubs/*.cs
echo "built $out/Gllm.dll and $out/BindingsTest.exe"
