// Stand-ins for the few UnityEngine types Unity/LlmCharacter.cs uses, so that build.sh can check that the
// file compiles against Gllm.dll without Unity. Not Unity: nothing here runs.
using System;

namespace UnityEngine
{
    public class Object { }
    public class Component : Object { }
    public class Behaviour : Component { }
    public class MonoBehaviour : Behaviour { }

    [AttributeUsage(AttributeTargets.Field)]
    public sealed class TooltipAttribute : Attribute { public TooltipAttribute(string tooltip) { } }

    [AttributeUsage(AttributeTargets.Field)]
    public sealed class TextAreaAttribute : Attribute { public TextAreaAttribute(int minLines, int maxLines) { } }

    [AttributeUsage(AttributeTargets.Field)]
    public sealed class HeaderAttribute : Attribute { public HeaderAttribute(string header) { } }
}

namespace UnityEngine.Events
{
    public class UnityEvent<T0>
    {
        public void Invoke(T0 arg0) { }
        public void AddListener(Action<T0> call) { }
    }
}
