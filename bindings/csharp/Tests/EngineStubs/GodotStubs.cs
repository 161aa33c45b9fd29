// Stand-ins for the few Godot 4 .NET types Godot/LlmNode.cs uses, and for the SignalName members that
// Godot's source generator adds to it, so that build.sh can check that the file compiles against Gllm.dll
// without GodotSharp. Not Godot: nothing here runs.
using System;

namespace Godot
{
    public sealed class StringName
    {
        public static implicit operator StringName(string name) { return new StringName(); }
    }

    public struct Variant
    {
        public static implicit operator Variant(string value) { return default(Variant); }
    }

    public enum PropertyHint { None, MultilineText }

    public enum Error { Ok }

    [AttributeUsage(AttributeTargets.Delegate)]
    public sealed class SignalAttribute : Attribute { }

    [AttributeUsage(AttributeTargets.Field | AttributeTargets.Property)]
    public sealed class ExportAttribute : Attribute
    {
        public ExportAttribute(PropertyHint hint = PropertyHint.None, string hintString = "") { }
    }

    public class GodotObject
    {
        public Error EmitSignal(StringName signal, params Variant[] args) { return Error.Ok; }

        public class SignalName { }
    }

    public class Node : GodotObject
    {
        public virtual void _Ready() { }
        public virtual void _ExitTree() { }

        public new class SignalName : GodotObject.SignalName { }
    }
}

public partial class LlmNode
{
    public new class SignalName : Godot.Node.SignalName
    {
        public static readonly Godot.StringName TokenReceived = "TokenReceived";
        public static readonly Godot.StringName LineFinished = "LineFinished";
        public static readonly Godot.StringName RequestFailed = "RequestFailed";
        public static readonly Godot.StringName RuntimeConnected = "RuntimeConnected";
        public static readonly Godot.StringName RuntimeDisconnected = "RuntimeDisconnected";
        public static readonly Godot.StringName ToolCalled = "ToolCalled";
    }
}
