// JSON text of decoded msgpack values (what MsgPack.Decode returns), for game code that wants a string:
// a tool call's arguments passed through a Godot signal, written to a log, shown in a debug overlay.
using System;
using System.Collections;
using System.Collections.Generic;
using System.Globalization;
using System.Text;

namespace Gllm
{
    public static class JsonText
    {
        public static string Write(object value)
        {
            var sb = new StringBuilder();
            Write(sb, value);
            return sb.ToString();
        }

        static void Write(StringBuilder sb, object v)
        {
            if (v == null) sb.Append("null");
            else if (v is bool b) sb.Append(b ? "true" : "false");
            else if (v is string s) WriteString(sb, s);
            else if (v is double d) sb.Append(double.IsNaN(d) || double.IsInfinity(d) ? "null" : d.ToString("R", CultureInfo.InvariantCulture));
            else if (v is float f) Write(sb, (double)f);
            else if (v is long || v is ulong || v is int) sb.Append(Convert.ToString(v, CultureInfo.InvariantCulture));
            else if (v is IDictionary map)
            {
                sb.Append('{');
                bool first = true;
                foreach (DictionaryEntry e in map)
                {
                    if (!first) sb.Append(", ");
                    first = false;
                    WriteString(sb, Convert.ToString(e.Key, CultureInfo.InvariantCulture));
                    sb.Append(": ");
                    Write(sb, e.Value);
                }
                sb.Append('}');
            }
            else if (v is IList list)
            {
                sb.Append('[');
                for (int i = 0; i < list.Count; i++)
                {
                    if (i > 0) sb.Append(", ");
                    Write(sb, list[i]);
                }
                sb.Append(']');
            }
            else throw new ArgumentException("no JSON form for a " + v.GetType().Name);
        }

        static void WriteString(StringBuilder sb, string s)
        {
            sb.Append('"');
            foreach (char c in s)
            {
                if (c == '"' || c == '\\') sb.Append('\\').Append(c);
                else if (c == '\n') sb.Append("\\n");
                else if (c == '\r') sb.Append("\\r");
                else if (c == '\t') sb.Append("\\t");
                else if (c < 0x20) sb.Append("\\u").Append(((int)c).ToString("x4"));
                else sb.Append(c);
            }
            sb.Append('"');
        }
    }
}
