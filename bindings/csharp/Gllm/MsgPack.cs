// msgpack encoder and decoder for the gLLM protocol (https://github.com/msgpack/msgpack/blob/master/spec.md).
//
// Decoded values are plain .NET objects, so game code needs no schema classes:
//   nil -> null, true/false -> bool, integers -> long (ulong only above long.MaxValue),
//   float 32 -> float, float 64 -> double, str -> string, bin -> byte[],
//   array -> List<object>, map -> Dictionary<string, object> (the protocol's maps have string keys).
// Encoding is the inverse, using the smallest format for every integer and string, as the runtime
// (msgpack-python) does, so that decode + encode reproduces the runtime's bytes exactly. Maps are written in
// the enumeration order of the dictionary: for a Dictionary that is never removed from, insertion order.
//
// The decoder treats its input as untrusted: every length is checked against the bytes that are left
// before anything is allocated, nesting is bounded, and anything outside the protocol (extension types,
// the reserved 0xc1 byte, non-string map keys, invalid UTF-8, trailing bytes) raises MsgPackException.
using System;
using System.Collections;
using System.Collections.Generic;
using System.Text;

namespace Gllm
{
    /// <summary>Bytes that are not one valid msgpack value, or a value msgpack cannot carry.</summary>
    public sealed class MsgPackException : Exception
    {
        public MsgPackException(string message) : base(message) { }
    }

    public static class MsgPack
    {
        /// <summary>Deepest nesting of arrays and maps accepted (the protocol needs 4).</summary>
        public const int MaxDepth = 64;

        static readonly UTF8Encoding StrictUtf8 = new UTF8Encoding(false, true);

        public static byte[] Encode(object value)
        {
            var w = new ByteWriter(64);
            Write(w, value, 0);
            return w.ToArray();
        }

        public static object Decode(byte[] data)
        {
            return Decode(data, 0, data.Length);
        }

        public static object Decode(byte[] data, int offset, int count)
        {
            if (data == null) throw new ArgumentNullException("data");
            var r = new Reader(data, offset, offset + count);
            object value = r.Read(0);
            if (r.Pos != r.End)
                throw new MsgPackException(string.Format("{0} extra bytes after the msgpack value", r.End - r.Pos));
            return value;
        }

        // ------------------------------------------------------------------------------------ encoding
        static void Write(ByteWriter w, object v, int depth)
        {
            if (depth > MaxDepth) throw new MsgPackException("nesting deeper than " + MaxDepth);
            if (v == null) { w.Byte(0xc0); return; }
            if (v is bool b) { w.Byte(b ? (byte)0xc3 : (byte)0xc2); return; }
            if (v is string s) { WriteString(w, s); return; }
            if (v is byte[] bin) { WriteBinary(w, bin); return; }
            if (v is double d) { w.Byte(0xcb); w.BigEndian(BitConverter.DoubleToInt64Bits(d), 8); return; }
            if (v is float f) { w.Byte(0xca); w.BigEndian(BitConverter.ToInt32(BitConverter.GetBytes(f), 0), 4); return; }
            if (v is ulong u)
            {
                if (u > long.MaxValue) { w.Byte(0xcf); w.BigEndian((long)u, 8); }
                else WriteInteger(w, (long)u);
                return;
            }
            if (v is long || v is int || v is short || v is sbyte || v is uint || v is ushort || v is byte)
            {
                WriteInteger(w, Convert.ToInt64(v));
                return;
            }
            if (v is IDictionary map) { WriteMap(w, map, depth); return; }
            if (v is IList list)
            {
                WriteHeader(w, list.Count, 0x90, 0xdc);
                foreach (object item in list) Write(w, item, depth + 1);
                return;
            }
            throw new MsgPackException("msgpack cannot carry a " + v.GetType().Name);
        }

        static void WriteInteger(ByteWriter w, long v)
        {
            if (v >= 0)
            {
                if (v < 0x80) w.Byte((byte)v);
                else if (v <= 0xff) { w.Byte(0xcc); w.Byte((byte)v); }
                else if (v <= 0xffff) { w.Byte(0xcd); w.BigEndian(v, 2); }
                else if (v <= 0xffffffffL) { w.Byte(0xce); w.BigEndian(v, 4); }
                else { w.Byte(0xcf); w.BigEndian(v, 8); }
            }
            else
            {
                if (v >= -32) w.Byte((byte)(sbyte)v);
                else if (v >= sbyte.MinValue) { w.Byte(0xd0); w.Byte((byte)(sbyte)v); }
                else if (v >= short.MinValue) { w.Byte(0xd1); w.BigEndian(v, 2); }
                else if (v >= int.MinValue) { w.Byte(0xd2); w.BigEndian(v, 4); }
                else { w.Byte(0xd3); w.BigEndian(v, 8); }
            }
        }

        static void WriteString(ByteWriter w, string s)
        {
            byte[] utf8;
            try { utf8 = StrictUtf8.GetBytes(s); }
            catch (ArgumentException) { throw new MsgPackException("a string with a lone surrogate cannot be UTF-8"); }
            int n = utf8.Length;
            if (n < 32) w.Byte((byte)(0xa0 | n));
            else if (n <= 0xff) { w.Byte(0xd9); w.Byte((byte)n); }
            else if (n <= 0xffff) { w.Byte(0xda); w.BigEndian(n, 2); }
            else { w.Byte(0xdb); w.BigEndian(n, 4); }
            w.Bytes(utf8);
        }

        static void WriteBinary(ByteWriter w, byte[] bin)
        {
            int n = bin.Length;
            if (n <= 0xff) { w.Byte(0xc4); w.Byte((byte)n); }
            else if (n <= 0xffff) { w.Byte(0xc5); w.BigEndian(n, 2); }
            else { w.Byte(0xc6); w.BigEndian(n, 4); }
            w.Bytes(bin);
        }

        static void WriteMap(ByteWriter w, IDictionary map, int depth)
        {
            WriteHeader(w, map.Count, 0x80, 0xde);
            IDictionaryEnumerator e = map.GetEnumerator();
            while (e.MoveNext())
            {
                if (!(e.Key is string key)) throw new MsgPackException("map keys must be strings");
                WriteString(w, key);
                Write(w, e.Value, depth + 1);
            }
        }

        /// <summary>Array (0x90/0xdc) or map (0x80/0xde) header: fix form below 16, else 16 or 32 bit.</summary>
        static void WriteHeader(ByteWriter w, int count, byte fixTag, byte tag16)
        {
            if (count < 16) w.Byte((byte)(fixTag | count));
            else if (count <= 0xffff) { w.Byte(tag16); w.BigEndian(count, 2); }
            else { w.Byte((byte)(tag16 + 1)); w.BigEndian(count, 4); }
        }

        // ------------------------------------------------------------------------------------ decoding
        sealed class Reader
        {
            readonly byte[] buf;
            public int Pos;
            public readonly int End;

            public Reader(byte[] buf, int start, int end)
            {
                if (start < 0 || end > buf.Length || start > end) throw new ArgumentOutOfRangeException("offset");
                this.buf = buf;
                Pos = start;
                End = end;
            }

            public object Read(int depth)
            {
                if (depth > MaxDepth) throw new MsgPackException("nesting deeper than " + MaxDepth);
                Take(1);
                byte tag = buf[Pos - 1];
                if (tag <= 0x7f) return (long)tag;
                if (tag >= 0xe0) return (long)(sbyte)tag;
                if (tag <= 0x8f) return ReadMap(tag & 0x0f, depth);
                if (tag <= 0x9f) return ReadArray(tag & 0x0f, depth);
                if (tag <= 0xbf) return ReadString(tag & 0x1f);
                switch (tag)
                {
                    case 0xc0: return null;
                    case 0xc2: return false;
                    case 0xc3: return true;
                    case 0xc4: return ReadBinary((int)Unsigned(1));
                    case 0xc5: return ReadBinary((int)Unsigned(2));
                    case 0xc6: return ReadBinary(Length(Unsigned(4)));
                    case 0xca: return BitConverter.ToSingle(BitConverter.GetBytes((int)Unsigned(4)), 0);
                    case 0xcb: return BitConverter.Int64BitsToDouble((long)Unsigned(8));
                    case 0xcc: return (long)Unsigned(1);
                    case 0xcd: return (long)Unsigned(2);
                    case 0xce: return (long)Unsigned(4);
                    case 0xcf:
                        ulong u = Unsigned(8);
                        return u > long.MaxValue ? (object)u : (long)u;
                    case 0xd0: return (long)(sbyte)Unsigned(1);
                    case 0xd1: return (long)(short)Unsigned(2);
                    case 0xd2: return (long)(int)Unsigned(4);
                    case 0xd3: return (long)Unsigned(8);
                    case 0xd9: return ReadString((int)Unsigned(1));
                    case 0xda: return ReadString((int)Unsigned(2));
                    case 0xdb: return ReadString(Length(Unsigned(4)));
                    case 0xdc: return ReadArray((int)Unsigned(2), depth);
                    case 0xdd: return ReadArray(Length(Unsigned(4)), depth);
                    case 0xde: return ReadMap((int)Unsigned(2), depth);
                    case 0xdf: return ReadMap(Length(Unsigned(4)), depth);
                    case 0xc1: throw new MsgPackException("0xc1 is never used in msgpack");
                    default: throw new MsgPackException(string.Format("extension type 0x{0:x2} is not part of the protocol", tag));
                }
            }

            /// <summary>Advance over n bytes, failing before any allocation if the input is shorter.</summary>
            void Take(int n)
            {
                if (n < 0 || n > End - Pos)
                    throw new MsgPackException(string.Format("truncated: {0} bytes needed, {1} left", n, End - Pos));
                Pos += n;
            }

            ulong Unsigned(int size)
            {
                Take(size);
                ulong v = 0;
                for (int i = Pos - size; i < Pos; i++) v = (v << 8) | buf[i];
                return v;
            }

            int Length(ulong n)
            {
                // Every element takes at least one byte, so no valid count exceeds what is left.
                if (n > (ulong)(End - Pos)) throw new MsgPackException(string.Format("truncated: a length of {0} with {1} bytes left", n, End - Pos));
                return (int)n;
            }

            string ReadString(int n)
            {
                Take(n);
                try { return StrictUtf8.GetString(buf, Pos - n, n); }
                catch (ArgumentException) { throw new MsgPackException("a msgpack str is not valid UTF-8"); }
            }

            byte[] ReadBinary(int n)
            {
                Take(n);
                var bin = new byte[n];
                Buffer.BlockCopy(buf, Pos - n, bin, 0, n);
                return bin;
            }

            List<object> ReadArray(int count, int depth)
            {
                var list = new List<object>(Length((ulong)count));
                for (int i = 0; i < count; i++) list.Add(Read(depth + 1));
                return list;
            }

            Dictionary<string, object> ReadMap(int count, int depth)
            {
                var map = new Dictionary<string, object>(Length((ulong)count * 2) / 2);
                for (int i = 0; i < count; i++)
                {
                    if (!(Read(depth + 1) is string key)) throw new MsgPackException("map keys must be strings");
                    if (map.ContainsKey(key)) throw new MsgPackException("duplicate map key '" + key + "'");
                    map.Add(key, Read(depth + 1));
                }
                return map;
            }
        }
    }

    /// <summary>A growable byte buffer with big-endian integer writes (msgpack and ZMTP are both big-endian).</summary>
    internal sealed class ByteWriter
    {
        byte[] buf;
        int len;

        public ByteWriter(int capacity) { buf = new byte[Math.Max(16, capacity)]; }

        public int Length { get { return len; } }

        public void Byte(byte b)
        {
            Reserve(1);
            buf[len++] = b;
        }

        public void Bytes(byte[] data)
        {
            Reserve(data.Length);
            Buffer.BlockCopy(data, 0, buf, len, data.Length);
            len += data.Length;
        }

        /// <summary>The low <paramref name="size"/> bytes of v, most significant first.</summary>
        public void BigEndian(long v, int size)
        {
            Reserve(size);
            for (int i = size - 1; i >= 0; i--) buf[len++] = (byte)(v >> (8 * i));
        }

        public byte[] ToArray()
        {
            var copy = new byte[len];
            Buffer.BlockCopy(buf, 0, copy, 0, len);
            return copy;
        }

        void Reserve(int n)
        {
            if (len + n <= buf.Length) return;
            Array.Resize(ref buf, Math.Max(buf.Length * 2, len + n));
        }
    }
}
