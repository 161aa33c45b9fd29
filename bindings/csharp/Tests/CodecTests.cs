// Offline checks: the msgpack codec against bindings/testvectors (decode equals the .json twin, re-encoding
// gives back the exact bytes), its edge cases and refusals, and ZMTP framing.
using System;
using System.Collections;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text;

namespace Gllm.Tests
{
    public static class CodecTests
    {
        public static void AddSteps(List<KeyValuePair<string, Action>> steps, string vectorsDir)
        {
            steps.Add(Step("msgpack round-trips every test vector", () => TestVectors(vectorsDir)));
            steps.Add(Step("msgpack integer, float, string, binary and container formats", Formats));
            steps.Add(Step("msgpack refuses malformed input", Refusals));
            steps.Add(Step("zmtp greeting, READY and PING/PONG", ZmtpCommands));
            steps.Add(Step("zmtp frames in pieces, short and long, and refusals", ZmtpFrames));
        }

        static KeyValuePair<string, Action> Step(string name, Action action)
        {
            return new KeyValuePair<string, Action>(name, action);
        }

        static void TestVectors(string dir)
        {
            string[] files = Directory.GetFiles(dir, "*.msgpack");
            Check.That(files.Length > 0, "test vectors found in " + dir);
            foreach (string path in files.OrderBy(p => p))
            {
                string name = Path.GetFileName(path);
                byte[] bytes = File.ReadAllBytes(path);
                object decoded = MsgPack.Decode(bytes);
                object expected = MiniJson.Parse(File.ReadAllText(Path.ChangeExtension(path, ".json"), Encoding.UTF8));
                string diff = Diff(expected, decoded, "$");
                Check.That(diff == null, name + " decodes to its .json: " + diff);
                byte[] again = MsgPack.Encode(decoded);
                Check.That(again.SequenceEqual(bytes), name + " re-encodes to the same bytes (" + Hex(again) + " vs " + Hex(bytes) + ")");
            }
        }

        /// <summary>Null when equal, else the path of the first difference. JSON cannot tell float32 from
        /// float64, so a decoded float compares as a double.</summary>
        public static string Diff(object expected, object actual, string path)
        {
            if (actual is float f) actual = (double)f;
            if (expected is Dictionary<string, object> bin && bin.Count == 1 && bin.ContainsKey("$bin"))
            {   // JSON has no bytes: the vectors write msgpack bin as {"$bin": base64}
                byte[] want = Convert.FromBase64String((string)bin["$bin"]);
                return actual is byte[] got && got.SequenceEqual(want) ? null : path + ": bin " + Hex(want) + " vs " + Show(actual);
            }
            if (expected == null || actual == null)
                return expected == actual ? null : path + ": " + Show(expected) + " vs " + Show(actual);
            if (expected.GetType() != actual.GetType())
                return path + ": " + expected.GetType().Name + " vs " + actual.GetType().Name;
            if (expected is Dictionary<string, object> em)
            {
                var am = (Dictionary<string, object>)actual;
                if (!em.Keys.SequenceEqual(am.Keys)) return path + ": keys " + string.Join(",", em.Keys) + " vs " + string.Join(",", am.Keys);
                foreach (var kv in em)
                {
                    string d = Diff(kv.Value, am[kv.Key], path + "." + kv.Key);
                    if (d != null) return d;
                }
                return null;
            }
            if (expected is List<object> el)
            {
                var al = (List<object>)actual;
                if (el.Count != al.Count) return path + ": " + el.Count + " items vs " + al.Count;
                for (int i = 0; i < el.Count; i++)
                {
                    string d = Diff(el[i], al[i], path + "[" + i + "]");
                    if (d != null) return d;
                }
                return null;
            }
            return expected.Equals(actual) ? null : path + ": " + Show(expected) + " vs " + Show(actual);
        }

        static string Show(object v) { return v == null ? "null" : v.GetType().Name + " " + v; }

        static string Hex(byte[] b) { return BitConverter.ToString(b.Take(48).ToArray()) + (b.Length > 48 ? "..." : ""); }

        static void RoundTrip(object value, int encodedLength, string what)
        {
            byte[] bytes = MsgPack.Encode(value);
            Check.Equal(encodedLength, bytes.Length, what + " encoded length");
            string diff = Diff(value, MsgPack.Decode(bytes), "$");
            Check.That(diff == null, what + " round trip: " + diff);
        }

        static void Formats()
        {
            var ints = new long[] { 0, 1, 127, 128, 255, 256, 65535, 65536, 4294967295, 4294967296, long.MaxValue,
                                    -1, -32, -33, -128, -129, -32768, -32769, int.MinValue, (long)int.MinValue - 1, long.MinValue };
            var sizes = new[] { 1, 1, 1, 2, 2, 3, 3, 5, 5, 9, 9, 1, 1, 2, 2, 3, 3, 5, 5, 9, 9 };
            for (int i = 0; i < ints.Length; i++) RoundTrip(ints[i], sizes[i], "integer " + ints[i]);
            Check.Equal(ulong.MaxValue, (ulong)MsgPack.Decode(MsgPack.Encode(ulong.MaxValue)), "uint 64 above long.MaxValue");
            Check.Equal(5L, MsgPack.Decode(MsgPack.Encode((byte)5)), "a byte encodes as an integer");
            Check.Equal("CA-3F-C0-00-00", BitConverter.ToString(MsgPack.Encode(1.5f)), "float 32 bytes");
            Check.Equal(1.5f, MsgPack.Decode(MsgPack.Encode(1.5f)), "float 32 decodes to float");
            Check.Equal("CB-BF-E6-2E-42-FE-FA-39-EF", BitConverter.ToString(MsgPack.Encode(-0.6931471805599453)), "float 64 bytes");
            Check.Equal(double.NegativeInfinity, MsgPack.Decode(MsgPack.Encode(double.NegativeInfinity)), "infinity");
            foreach (int n in new[] { 0, 31, 32, 255, 256, 65535, 65536 })
            {
                string s = new string('é', n / 2) + new string('a', n % 2);  // é is 2 bytes of UTF-8
                int header = n < 32 ? 1 : n < 256 ? 2 : n < 65536 ? 3 : 5;
                RoundTrip(s, header + n, "string of " + n + " bytes");
            }
            RoundTrip("Où est la forge ? 🔨", 1 + Encoding.UTF8.GetByteCount("Où est la forge ? 🔨"), "non-ASCII string");
            foreach (int n in new[] { 0, 255, 256, 70000 })
            {
                byte[] bin = Enumerable.Range(0, n).Select(i => (byte)i).ToArray();
                byte[] bytes = MsgPack.Encode(bin);
                Check.Equal(n + (n < 256 ? 2 : n < 65536 ? 3 : 5), bytes.Length, "bin of " + n + " bytes");
                Check.That(((byte[])MsgPack.Decode(bytes)).SequenceEqual(bin), "bin round trip");
            }
            foreach (int n in new[] { 0, 15, 16, 65535, 65536 })
            {
                var list = Enumerable.Range(0, n).Select(i => (object)(long)(i % 100)).ToList();
                RoundTrip(list, (n < 16 ? 1 : n < 65536 ? 3 : 5) + n, "array of " + n);
            }
            foreach (int n in new[] { 15, 16 })
            {
                var map = new Dictionary<string, object>();
                for (int i = 0; i < n; i++) map["k" + (char)('a' + i)] = i % 2 == 0 ? (object)null : true;
                RoundTrip(map, (n < 16 ? 1 : 3) + n * 4, "map of " + n);
            }
            var nested = new Dictionary<string, object> { { "a", new List<object> { new List<int> { 1, 2 }, new int[] { 3 } } } };
            Check.Equal("81-A1-61-92-92-01-02-91-03", BitConverter.ToString(MsgPack.Encode(nested)), "typed lists and arrays encode as arrays");
            Check.Throws<MsgPackException>(() => MsgPack.Encode(new Dictionary<int, object> { { 1, 2 } }), "non-string map keys");
            Check.Throws<MsgPackException>(() => MsgPack.Encode(DateTime.Now), "a type msgpack has no format for");
        }

        static void Refusals()
        {
            var bad = new Dictionary<string, byte[]>
            {
                { "empty input", new byte[0] },
                { "0xc1", new byte[] { 0xc1 } },
                { "fixext", new byte[] { 0xd4, 0x01, 0x00 } },
                { "ext 8", new byte[] { 0xc7, 0x01, 0x05, 0x00 } },
                { "truncated array", new byte[] { 0x92, 0x01 } },
                { "truncated uint 32", new byte[] { 0xce, 0x00, 0x01 } },
                { "a str 32 longer than the input", new byte[] { 0xdb, 0xff, 0xff, 0xff, 0xff, 0x61 } },
                { "an array 32 longer than the input", new byte[] { 0xdd, 0x7f, 0xff, 0xff, 0xff, 0x01 } },
                { "a map 32 longer than the input", new byte[] { 0xdf, 0x7f, 0xff, 0xff, 0xff, 0x01 } },
                { "trailing bytes", new byte[] { 0x01, 0x02 } },
                { "invalid UTF-8", new byte[] { 0xa2, 0xc3, 0x28 } },
                { "integer map key", new byte[] { 0x81, 0x01, 0x02 } },
                { "duplicate map key", new byte[] { 0x82, 0xa1, 0x61, 0x01, 0xa1, 0x61, 0x02 } },
                { "nesting deeper than MaxDepth", Enumerable.Repeat((byte)0x91, 100).Concat(new byte[] { 0x00 }).ToArray() },
            };
            foreach (var kv in bad) Check.Throws<MsgPackException>(() => MsgPack.Decode(kv.Value), kv.Key);
            var deep = Enumerable.Repeat((byte)0x91, MsgPack.MaxDepth).Concat(new byte[] { 0x00 }).ToArray();
            Check.That(MsgPack.Decode(deep) is List<object>, "nesting of exactly MaxDepth decodes");
        }

        static void ZmtpCommands()
        {
            byte[] g = Zmtp.Greeting();
            Check.Equal("FF-00-00-00-00-00-00-00-00-7F-03-01-4E-55-4C-4C", BitConverter.ToString(g, 0, 16), "greeting start");
            Check.That(g.Length == 64 && g.Skip(16).All(b => b == 0), "greeting is 64 bytes, zero after NULL");
            Zmtp.CheckGreeting(g);
            var curve = (byte[])g.Clone();
            Encoding.ASCII.GetBytes("CURVE").CopyTo(curve, 12);
            Check.Throws<ZmtpException>(() => Zmtp.CheckGreeting(curve), "a CURVE greeting");
            var old = (byte[])g.Clone();
            old[10] = 2;
            Check.Throws<ZmtpException>(() => Zmtp.CheckGreeting(old), "a ZMTP 2 greeting");
            Check.Throws<ZmtpException>(() => Zmtp.CheckGreeting(Encoding.ASCII.GetBytes("GET / HTTP/1.1\r\n".PadRight(64))), "HTTP");

            byte[] ready = Zmtp.CommandFrame("READY", Zmtp.ReadyData("DEALER"));
            Check.Equal("04-29-05-52-45-41-44-59-0B-53-6F-63-6B-65-74-2D-54-79-70-65-00-00-00-06-44-45-41-4C-45-52-08-49-64-65-6E-74-69-74-79-00-00-00-00",
                        BitConverter.ToString(ready), "READY frame bytes");
            var reader = new ZmtpReader(1 << 20);
            reader.Feed(ready, 0, ready.Length);
            ZmtpFrame frame;
            Check.That(reader.TryTakeFrame(out frame) && frame.IsCommand && !frame.More, "READY reads back as a command");
            byte[] data;
            Check.Equal("READY", Zmtp.CommandName(frame.Body, out data), "command name");
            var props = Zmtp.ParseMetadata(data);
            Check.Equal("DEALER", Encoding.ASCII.GetString(props["socket-type"]), "Socket-Type property (case-insensitive name)");
            Check.Equal(0, props["identity"].Length, "empty Identity");
            Check.Throws<ZmtpException>(() => Zmtp.ParseMetadata(new byte[] { 0x04, 0x41, 0x42 }), "a property cut short");
            Check.Throws<ZmtpException>(() => Zmtp.CommandName(new byte[] { 0x09, 0x41 }, out data), "a name longer than the command");

            byte[] ping = new byte[] { 0x00, 0x1e, 0xaa, 0xbb };  // TTL 3 s, context AA BB
            Check.Equal("AA-BB", BitConverter.ToString(Zmtp.PongData(ping)), "PONG echoes the PING context");
            Check.Equal("00-32", BitConverter.ToString(Zmtp.PingData(TimeSpan.FromSeconds(5))), "PING TTL in tenths of seconds");
            Check.Throws<ZmtpException>(() => Zmtp.PongData(new byte[20]), "a PING context over 16 bytes");
        }

        static void ZmtpFrames()
        {
            byte[] shortBody = Encoding.ASCII.GetBytes("hello"), longBody = Enumerable.Range(0, 300).Select(i => (byte)i).ToArray();
            byte[] shortFrame = Zmtp.MessageFrame(shortBody), longFrame = Zmtp.MessageFrame(longBody, more: true);
            Check.Equal("00-05-68-65-6C-6C-6F", BitConverter.ToString(shortFrame), "short frame bytes");
            Check.Equal("03-00-00-00-00-00-00-01-2C", BitConverter.ToString(longFrame, 0, 9), "long frame header (LONG|MORE, 8-byte size)");
            byte[] stream = longFrame.Concat(shortFrame).ToArray();
            var reader = new ZmtpReader(1 << 20);
            var frames = new List<ZmtpFrame>();
            foreach (byte b in stream)  // one byte at a time: frames must come out whole, at the right moment
            {
                reader.Feed(new[] { b }, 0, 1);
                ZmtpFrame f;
                while (reader.TryTakeFrame(out f)) frames.Add(f);
            }
            Check.Equal(2, frames.Count, "frames read from a byte-by-byte stream");
            Check.That(frames[0].More && frames[0].Body.SequenceEqual(longBody), "long frame body and MORE flag");
            Check.That(!frames[1].More && frames[1].Body.SequenceEqual(shortBody), "short frame body");
            Check.Equal(0, reader.Buffered, "nothing left over");

            var refusals = new Dictionary<string, byte[]>
            {
                { "reserved flag bits", new byte[] { 0x08, 0x00 } },
                { "a command with MORE", new byte[] { 0x05, 0x00 } },
                { "a frame over the size limit", new byte[] { 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x01 } },
                { "a size with the top bit set", new byte[] { 0x02, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00 } },
            };
            foreach (var kv in refusals)
            {
                var r = new ZmtpReader(1 << 20);
                r.Feed(kv.Value, 0, kv.Value.Length);
                ZmtpFrame f;
                Check.Throws<ZmtpException>(() => r.TryTakeFrame(out f), kv.Key);
            }
        }
    }
}
