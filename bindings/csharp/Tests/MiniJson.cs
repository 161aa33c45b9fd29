// A small JSON reader for the test vectors' .json files, producing the same value model as MsgPack.Decode
// (long for integers, double for numbers with a fraction or exponent, List<object>, Dictionary<string, object>),
// so that a decoded .msgpack file and its .json twin can be compared with one deep-equality function.
using System;
using System.Collections.Generic;
using System.Globalization;
using System.Text;

namespace Gllm.Tests
{
    public static class MiniJson
    {
        public static object Parse(string text)
        {
            int pos = 0;
            object value = Value(text, ref pos);
            SkipSpace(text, ref pos);
            if (pos != text.Length) throw new FormatException("trailing characters at " + pos);
            return value;
        }

        static object Value(string s, ref int pos)
        {
            SkipSpace(s, ref pos);
            if (pos >= s.Length) throw new FormatException("unexpected end");
            char c = s[pos];
            if (c == '{') return Object(s, ref pos);
            if (c == '[') return Array(s, ref pos);
            if (c == '"') return String(s, ref pos);
            if (Literal(s, ref pos, "null")) return null;
            if (Literal(s, ref pos, "true")) return true;
            if (Literal(s, ref pos, "false")) return false;
            return Number(s, ref pos);
        }

        static Dictionary<string, object> Object(string s, ref int pos)
        {
            var map = new Dictionary<string, object>();
            pos++;
            SkipSpace(s, ref pos);
            if (s[pos] == '}') { pos++; return map; }
            while (true)
            {
                SkipSpace(s, ref pos);
                string key = String(s, ref pos);
                SkipSpace(s, ref pos);
                Expect(s, ref pos, ':');
                map.Add(key, Value(s, ref pos));
                SkipSpace(s, ref pos);
                if (s[pos] == '}') { pos++; return map; }
                Expect(s, ref pos, ',');
            }
        }

        static List<object> Array(string s, ref int pos)
        {
            var list = new List<object>();
            pos++;
            SkipSpace(s, ref pos);
            if (s[pos] == ']') { pos++; return list; }
            while (true)
            {
                list.Add(Value(s, ref pos));
                SkipSpace(s, ref pos);
                if (s[pos] == ']') { pos++; return list; }
                Expect(s, ref pos, ',');
            }
        }

        static string String(string s, ref int pos)
        {
            Expect(s, ref pos, '"');
            var sb = new StringBuilder();
            while (s[pos] != '"')
            {
                char c = s[pos++];
                if (c != '\\') { sb.Append(c); continue; }
                char e = s[pos++];
                switch (e)
                {
                    case 'n': sb.Append('\n'); break;
                    case 't': sb.Append('\t'); break;
                    case 'r': sb.Append('\r'); break;
                    case 'b': sb.Append('\b'); break;
                    case 'f': sb.Append('\f'); break;
                    case 'u':
                        sb.Append((char)int.Parse(s.Substring(pos, 4), NumberStyles.HexNumber));  // surrogates pair up by themselves
                        pos += 4;
                        break;
                    default: sb.Append(e); break;  // \" \\ \/
                }
            }
            pos++;
            return sb.ToString();
        }

        static object Number(string s, ref int pos)
        {
            int start = pos;
            bool isFloat = false;
            while (pos < s.Length && "+-0123456789.eE".IndexOf(s[pos]) >= 0)
            {
                if (".eE".IndexOf(s[pos]) >= 0) isFloat = true;
                pos++;
            }
            string token = s.Substring(start, pos - start);
            if (token.Length == 0) throw new FormatException("unexpected character at " + start);
            if (isFloat) return double.Parse(token, NumberStyles.Float, CultureInfo.InvariantCulture);
            long l;
            if (long.TryParse(token, NumberStyles.Integer, CultureInfo.InvariantCulture, out l)) return l;
            return ulong.Parse(token, CultureInfo.InvariantCulture);
        }

        static bool Literal(string s, ref int pos, string word)
        {
            if (string.CompareOrdinal(s, pos, word, 0, word.Length) != 0) return false;
            pos += word.Length;
            return true;
        }

        static void Expect(string s, ref int pos, char c)
        {
            if (pos >= s.Length || s[pos] != c) throw new FormatException("expected '" + c + "' at " + pos);
            pos++;
        }

        static void SkipSpace(string s, ref int pos)
        {
            while (pos < s.Length && char.IsWhiteSpace(s[pos])) pos++;
        }
    }
}
